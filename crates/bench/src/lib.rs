//! livemig's measured benchmarks and what they stand on: two hosts as network namespaces
//! ([`testbed`]), raw link goodput and interface counters ([`netns`]), the VMMs compared
//! ([`peer`]: livemig, and QEMU over QMP in [`qemu`]), the child processes they run as
//! ([`child`]), and the report ([`table`], [`chart`]). [`transports`] is `livemig bench
//! transports`; [`mechanisms`] is `livemig bench mechanisms`; [`devices`] (a VM with a disk
//! and a NIC, with the client's UDP echo stream from [`echo`]) is `livemig bench devices`.
// Figures here are rates and times in f64, cast back to counts for display: `as` saturates,
// and nothing here addresses memory or parses the wire.
#![allow(clippy::cast_sign_loss)]
pub mod chart;
pub mod devices;
pub mod echo;
pub mod guest_rate;
pub mod hostdrain;
pub mod hostmem;
pub mod mechanisms;
pub mod netns;
pub mod peer;
pub mod qemu;
pub mod table;
pub mod testbed;
pub mod transports;

use std::time::Duration;

use testbed::{Link, Testbed};

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum BenchError {
    /// the bench needs root (network namespaces); run as root
    NotRoot,
    /// /dev/kvm is not available; the bench boots VMs
    NoKvm,
    /// --peer qemu: qemu-system-x86_64 is not installed (scripts/setup.sh installs it)
    NoQemu,
    /// testbed: {0}
    Testbed(#[from] testbed::TestbedError),
    /// measuring link goodput: {0}
    Netns(#[from] netns::NetnsError),
    /// {0}
    Qemu(#[from] qemu::QemuError),
    /// {what}: {msg}
    Step { what: String, msg: String },
    /// {0}
    Io(#[from] std::io::Error),
}

/// An error of one step of a bench, with what it was doing.
pub fn step<E: std::fmt::Display>(what: impl Into<String>) -> impl FnOnce(E) -> BenchError {
    let what = what.into();
    move |e| BenchError::Step {
        what,
        msg: e.to_string(),
    }
}

/// What a bench of VMs refuses before it starts: no root, no KVM, no QEMU for `--peer qemu`,
/// a testbed name too long for interface names, more guest memory than the machine holds.
pub fn preflight(peer_qemu: bool, testbed: &str, memory: u64) -> Result<(), BenchError> {
    if !testbed::is_root() {
        return Err(BenchError::NotRoot);
    }
    if !kvm_available() {
        return Err(BenchError::NoKvm);
    }
    if peer_qemu && !qemu::available() {
        return Err(BenchError::NoQemu);
    }
    if testbed.len() > 7 {
        return Err(step("--testbed")(format!(
            "{testbed:?} is too long for interface names (7 characters at most)"
        )));
    }
    // Peak memory: two livemig VMs mid-migration; for QEMU, its source keeps a copy of the RAM
    // image it loaded (to reload on reset) beside the RAM, plus the destination.
    let need = memory * if peer_qemu { 3 } else { 2 } + (512 << 20);
    match ram::host::mem_available() {
        Some(avail) if need > avail => Err(step("--memory")(format!(
            "{} MiB of guest needs about {} MiB free {}, this machine has {} MiB",
            memory >> 20,
            need >> 20,
            if peer_qemu { "with --peer qemu" } else { "" },
            avail >> 20
        ))),
        _ => Ok(()),
    }
}

/// Whether /dev/kvm can be opened for VMs.
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Where a migration goes: the testbed's two hosts and the links of a run.
#[derive(Clone)]
pub struct Route<'a> {
    pub tb: &'a Testbed,
    pub from_a: bool,
    pub links: Vec<&'a Link>,
}

impl<'a> Route<'a> {
    /// `links` by name, from host A (or B) to the other.
    pub fn new(tb: &'a Testbed, links: &[&str], from_a: bool) -> Result<Self, BenchError> {
        let links = links
            .iter()
            .map(|n| {
                tb.links
                    .iter()
                    .find(|l| l.name == *n)
                    .ok_or_else(|| step("testbed")(format!("no link {n}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Route { tb, from_a, links })
    }

    pub fn src_ns(&self) -> &'a str {
        if self.from_a {
            &self.tb.host_a
        } else {
            &self.tb.host_b
        }
    }

    pub fn dst_ns(&self) -> &'a str {
        if self.from_a {
            &self.tb.host_b
        } else {
            &self.tb.host_a
        }
    }

    /// (local, remote) address per link.
    pub fn pairs(&self) -> Vec<(String, String)> {
        self.links
            .iter()
            .map(|l| {
                if self.from_a {
                    (l.addr_a.clone(), l.addr_b.clone())
                } else {
                    (l.addr_b.clone(), l.addr_a.clone())
                }
            })
            .collect()
    }

    pub fn src_devs(&self) -> Vec<String> {
        self.links
            .iter()
            .map(|l| if self.from_a { &l.dev_a } else { &l.dev_b }.clone())
            .collect()
    }

    pub fn direction(&self) -> String {
        format!("{} -> {}", self.src_ns(), self.dst_ns())
    }

    /// The links' names joined, as rows and charts name them.
    pub fn name(&self) -> String {
        self.links
            .iter()
            .map(|l| l.name)
            .collect::<Vec<_>>()
            .join("+")
    }

    /// The slowest time a migration of `memory` bytes may take before it counts as failed.
    pub fn timeout(&self, memory: u64) -> Duration {
        let bps: u64 = self
            .links
            .iter()
            .map(|l| l.shaped_bps.unwrap_or(10_000_000_000))
            .sum();
        // A fifth of the link, three times over: a stuck migration, not a slow one.
        Duration::from_secs(60) + Duration::from_secs_f64(memory as f64 * 8.0 * 15.0 / bps as f64)
    }
}

/// Progress on a terminal (a bar with the live rate), plain lines otherwise.
pub struct Ui {
    bar: Option<indicatif::ProgressBar>,
}

impl Ui {
    pub fn new(steps: u64) -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(steps);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {pos}/{len} {wide_msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        Ui { bar }
    }

    pub fn start(&self, what: &str) {
        match &self.bar {
            Some(b) => b.set_message(what.to_string()),
            None => eprintln!("bench: {what}"),
        }
    }

    pub fn done(&self, line: &str) {
        match &self.bar {
            Some(b) => {
                b.println(line);
                b.inc(1);
            }
            None => eprintln!("bench: {line}"),
        }
    }

    /// Steps found on the way (a drain run again).
    pub fn more(&self, steps: u64) {
        if let Some(b) = &self.bar {
            b.inc_length(steps);
        }
    }

    /// A callback for the byte sampler: the live amount and rate on the bar.
    pub fn live(&self, what: &str) -> impl Fn(Duration, u64) + Send + 'static {
        let bar = self.bar.clone();
        let what = what.to_string();
        move |t, bytes| {
            if let Some(b) = &bar {
                let gbps = bytes as f64 * 8.0 / t.as_secs_f64().max(1e-3) / 1e9;
                b.set_message(format!("{what}: {} MiB, {gbps:.2} Gbit/s", bytes >> 20));
            }
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
