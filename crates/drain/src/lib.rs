//! Emptying a host: every running VM of a source agent moved to destination agents, as fast
//! as the links allow and never unsafely.
//!
//! Policy is pure and tested without VMs: [`predict`] (a VM's bytes and seconds from its
//! sample), [`plan`] (placement that never overcommits, order, ETA), [`window`] (how many
//! migrations at once; `auto` grows while throughput does), [`pace`] (one bandwidth budget
//! shared evenly), [`cpu`] (the hosts' cores: what guests and migrations take, and
//! `--reserve-cpu`), [`cores`] (how the model shares a pool's cores between them). Mechanism: [`survey`] (agents, links, samples), [`run`] (the sliding
//! window of migrations, retries, switchovers whose outcome is unknown, Ctrl-C), [`view`]
//! (progress), [`report`] (what happened).
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use migration::MigrateRequest;

pub mod cache;
pub mod cores;
pub mod cpu;
pub mod model;
pub mod pace;
pub mod plan;
pub mod predict;
pub mod pricing;
pub mod report;
pub mod resolve;
pub mod run;
pub mod survey;
pub mod view;
pub mod window;

pub use pace::Budget;
pub use plan::Order;
pub use report::{DrainReport, Status, VmOutcome};
pub use window::Concurrency;

/// Where a drain may send VMs.
#[derive(Clone, Debug)]
pub enum Destination {
    /// An agent whose API socket this process reaches, and the address its sources connect
    /// to (None: where it listens).
    Agent {
        sock: PathBuf,
        address: Option<String>,
    },
    /// A host known from what it told the cluster: its agent's API is on that host, so the
    /// drain uses no page cache there and learns the outcome of a lost switchover from the
    /// source's agent (which settles it through the cluster).
    Member(Member),
}

/// A cluster member as a drain sees it.
#[derive(Clone, Debug)]
pub struct Member {
    pub name: String,
    /// What sources connect to.
    pub address: String,
    /// Memory it can take now.
    pub room: u64,
    pub bridge: bool,
    /// The directories of disk images it reaches.
    pub storage: Vec<PathBuf>,
    pub max_inbound: usize,
    /// The CPU features it offers guests (empty: unknown).
    pub cpu_features: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct DrainOptions {
    /// The source agent's API socket.
    pub from: PathBuf,
    pub to: Vec<Destination>,
    /// Every migration's options (`to` is set per VM).
    pub request: MigrateRequest,
    pub concurrency: Concurrency,
    pub order: Order,
    pub budget: Budget,
    /// Attempts after the first for a VM whose migration failed.
    pub retries: u32,
    /// Bytes of page cache to ask each destination for, for dedup across the drain's VMs
    /// (0: none; only with dedup, and not on the direct transport).
    pub dedup_cache: u64,
    pub dry_run: bool,
    /// Measure each link for this long first (0: do not).
    pub probe_ms: u64,
    /// Sample each VM's dirty rate for this long (0: do not).
    pub sample_ms: u64,
    /// Bars, lines or nothing.
    pub show: view::Show,
    /// Set by Ctrl-C or SIGTERM: cancel what is in flight, start nothing more.
    pub interrupted: Arc<AtomicBool>,
}

impl DrainOptions {
    /// Whether VMs whose disks a destination cannot open may go with their disks copied
    /// (`drain --storage copy`).
    pub fn copies_disks(&self) -> bool {
        self.request.storage == Some(migration::Storage::Copy)
    }
}

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum DrainError {
    /// the source agent at {path}: {source}
    Source {
        path: PathBuf,
        source: unixhttp::ApiError,
    },
    /// the destination agent at {path}: {source}
    Destination {
        path: PathBuf,
        source: unixhttp::ApiError,
    },
    /// no destination: give --to
    NoDestination,
    /// --network names one destination's NICs: use it with a single --to
    NetworkWithManyDestinations,
    /// --reserve {0}% leaves nothing for the drain
    Reserve(f64),
    /// --reserve-cpu {0}% leaves nothing for the drain
    ReserveCpu(f64),
    /// destination {name} listens on {listen}: give --address HOST:PORT, the address sources reach it on
    NoAddress { name: String, listen: String },
    /// {0}
    Request(#[from] migration::request::RequestError),
}

/// Drains `o.from` into `o.to` (or, with `dry_run`, says how it would).
pub fn drain(o: &DrainOptions) -> Result<DrainReport, DrainError> {
    check(o)?;
    let t0 = std::time::Instant::now();
    let mut survey = survey::survey(o)?;
    let mut cpu = survey.cpu.take();
    if let Some(m) = cpu.as_mut() {
        m.started();
    }
    if let Some(r) = cpu
        .as_ref()
        .and_then(|m| m.dirty_ratio(&run::drain_cost_key(o, &survey), o.concurrency.fixed()))
    {
        for v in &mut survey.vms {
            v.dirty_ratio = r;
        }
    }
    let planned = run::Planned::make(o, &survey, cpu.as_ref());
    if o.dry_run {
        return Ok(planned.dry_report(o, &survey));
    }
    Ok(run::Run::new(o, &survey, &planned, t0, cpu).go())
}

fn check(o: &DrainOptions) -> Result<(), DrainError> {
    if o.to.is_empty() {
        return Err(DrainError::NoDestination);
    }
    if o.request.network.is_some() && o.to.len() > 1 {
        return Err(DrainError::NetworkWithManyDestinations);
    }
    if !(0.0..1.0).contains(&o.budget.reserve) {
        return Err(DrainError::Reserve(o.budget.reserve * 100.0));
    }
    if let Some(r) = o.budget.reserve_cpu.filter(|r| !(0.0..1.0).contains(r)) {
        return Err(DrainError::ReserveCpu(r * 100.0));
    }
    if o.request.to.is_empty() {
        // Checks the per-migration options once, with a placeholder destination.
        let probe = MigrateRequest {
            to: "127.0.0.1:1".into(),
            ..o.request.clone()
        };
        probe.options()?;
    }
    Ok(())
}
