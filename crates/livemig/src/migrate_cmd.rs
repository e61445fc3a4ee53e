//! `livemig migrate` / `livemig receive` and the migration routes of a VM's API.
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use migration::{MigrateOptions, Progress, Report};
use serde::Deserialize;
use serde_json::json;
use vmm::api::{Client, Extension};
use vmm::Vm;

#[derive(Deserialize)]
pub struct MigrateRequest {
    pub to: String,
    pub downtime_ms: Option<u64>,
    pub max_rounds: Option<u32>,
    /// bits/s
    pub max_bandwidth: Option<u64>,
    /// tcp (default) or compressed
    pub transport: Option<String>,
    /// Page streams to `to`.
    pub channels: Option<u16>,
    /// LOCAL>REMOTE,... one page stream per NIC pair.
    pub network: Option<String>,
    /// Throttle the guest when rounds stop shrinking (default true).
    pub auto_converge: Option<bool>,
}

/// `10.0.1.1>10.0.1.2,10.0.2.1>10.0.2.2` into (local address, remote host) pairs.
pub fn parse_network(s: &str) -> Result<Vec<(std::net::IpAddr, String)>, String> {
    s.split(',')
        .map(|pair| {
            let (l, r) = pair
                .split_once('>')
                .ok_or_else(|| format!("{pair:?} is not LOCAL>REMOTE"))?;
            let local = l
                .trim()
                .parse()
                .map_err(|e| format!("local address {l:?}: {e}"))?;
            let remote = r.trim();
            if remote.is_empty() {
                return Err(format!("{pair:?} has no remote address"));
            }
            Ok((local, remote.to_string()))
        })
        .collect()
}

impl MigrateRequest {
    pub fn options(&self) -> Result<MigrateOptions, String> {
        let mut o = MigrateOptions::new(self.to.clone());
        if let Some(t) = &self.transport {
            o.transport = t.parse()?;
        }
        if let Some(d) = self.downtime_ms {
            o.policy.downtime_target = Duration::from_millis(d);
        }
        if let Some(r) = self.max_rounds {
            o.policy.max_rounds = r;
        }
        if self.auto_converge == Some(false) {
            o.policy.auto_converge = None;
        }
        o.max_bandwidth = self.max_bandwidth;
        o.channels = self.channels.unwrap_or(0);
        if let Some(n) = &self.network {
            o.network = parse_network(n)?;
        }
        Ok(o)
    }
}

/// `POST /vm/migrate {"to": "HOST:PORT", "downtime_ms": N}` runs a migration and answers with
/// its report; `GET /vm/migration` tells where a running one is.
pub fn api_extension() -> Extension {
    let progress: Arc<Mutex<Option<Progress>>> = Arc::new(Mutex::new(None));
    Arc::new(
        move |method: &str, url: &str, body: &[u8], vm: &Arc<Mutex<Vm>>| match (method, url) {
            ("POST", "/vm/migrate") => Some((|| {
                let req: MigrateRequest = serde_json::from_slice(body)
                    .map_err(|e| (400, format!("migrate needs {{\"to\": \"HOST:PORT\"}}: {e}")))?;
                let p = progress.clone();
                let opts = req.options().map_err(|e| (400, e))?;
                let report = migration::migrate(vm, &opts, &move |pr: &Progress| {
                    *p.lock().unwrap_or_else(|e| e.into_inner()) = Some(pr.clone());
                })
                .map_err(|e| (500, e.to_string()))?;
                serde_json::to_value(&report).map_err(|e| (500, e.to_string()))
            })()),
            ("GET", "/vm/migration") => Some(Ok(json!(*progress
                .lock()
                .unwrap_or_else(|e| e.into_inner())))),
            _ => None,
        },
    )
}

/// Client side: asks the source VM's process to migrate, shows progress, prints the summary.
pub fn migrate(
    api: &Path,
    req: serde_json::Value,
    report_path: Option<PathBuf>,
) -> Result<Report, Box<dyn std::error::Error>> {
    let api = api.to_path_buf();
    let worker = {
        let api = api.clone();
        std::thread::spawn(move || {
            Client::new(api)
                .with_timeout(Duration::from_secs(3600))
                .call::<Report>("POST", "/vm/migrate", Some(req))
        })
    };
    let tty = std::io::stderr().is_terminal();
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg:12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let client = Client::new(&api);
    let mut last_phase = String::new();
    while !worker.is_finished() {
        std::thread::sleep(Duration::from_millis(200));
        let Ok(Some(p)) = client.call::<Option<Progress>>("GET", "/vm/migration", None) else {
            continue;
        };
        match &bar {
            Some(b) => {
                b.set_length(p.ram_bytes);
                b.set_position(p.bytes_on_wire.min(p.ram_bytes));
                b.set_message(format!("{} r{}", p.phase, p.round));
            }
            None if p.phase != last_phase => {
                eprintln!(
                    "migration: {} (round {}, {} MiB sent)",
                    p.phase,
                    p.round,
                    p.bytes_on_wire >> 20
                );
            }
            None => {}
        }
        last_phase = p.phase;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let report = worker
        .join()
        .map_err(|_| "the migrate request thread panicked")??;
    if let Some(p) = report_path {
        std::fs::write(&p, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(report)
}
