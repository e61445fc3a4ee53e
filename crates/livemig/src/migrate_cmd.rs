//! `livemig migrate`: asks a VM's process (its API's migration endpoints,
//! [`migration::api`]) to migrate under a lease, shows progress, cancels on a signal.
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use migration::{MigrateRequest, Progress, Report};
use vmm::api::Client;

/// How often the client renews its lease (it asks for progress 5 times a second).
const LEASE: Duration = Duration::from_secs(3);

/// `livemig migrate`: asks the source VM's process to migrate, shows progress, prints the
/// summary; fails unless the guest verified on the destination (a foreign guest, which cannot
/// verify itself, is not a failure). Ctrl-C or SIGTERM cancels the migration.
pub fn main(
    api: &Path,
    req: MigrateRequest,
    report: Option<PathBuf>,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let r = migrate(api, req, report)?;
    crate::out::say(&r.summary());
    use migration::report::Verification;
    Ok(match r.verification {
        Verification::Verified | Verification::NotVerifiable => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

/// `livemig migrate --cancel`.
pub fn cancel(api: &Path) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let v: serde_json::Value = Client::new(api).call("DELETE", "/vm/migration", None)?;
    crate::out::say(&format!(
        "cancelled the migration to {}",
        v["to"].as_str().unwrap_or("?")
    ));
    Ok(ExitCode::SUCCESS)
}

/// `livemig migrate --resume [--to ADDR]`.
pub fn resume(api: &Path, to: Option<String>) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let body = serde_json::to_value(migration::api::ResumeRequest { to })?;
    let v: serde_json::Value = Client::new(api).call("POST", "/vm/migration/resume", Some(body))?;
    crate::out::say(&format!(
        "post-copy resuming to {}",
        v["to"].as_str().unwrap_or("?")
    ));
    Ok(ExitCode::SUCCESS)
}

/// Client side: runs the request under a lease, showing progress meanwhile; a signal cancels.
pub fn migrate(
    api: &Path,
    mut req: MigrateRequest,
    report_path: Option<PathBuf>,
) -> Result<Report, Box<dyn std::error::Error>> {
    req.lease_ms = Some(LEASE.as_millis() as u64);
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, interrupted.clone())?;
    }
    let body = serde_json::to_value(&req)?;
    let worker = {
        let api = api.to_path_buf();
        std::thread::spawn(move || {
            Client::new(api)
                .with_timeout(Duration::from_secs(24 * 3600))
                .call::<Report>("POST", "/vm/migrate", Some(body))
        })
    };
    let bar = ProgressView::new();
    let client = Client::new(api).with_timeout(Duration::from_secs(10));
    let mut cancelled = false;
    while !worker.is_finished() {
        std::thread::sleep(Duration::from_millis(200));
        if interrupted.load(Ordering::SeqCst) && !cancelled {
            cancelled = true;
            eprintln!("livemig: interrupted: cancelling the migration");
            if let Err(e) = client.call::<serde_json::Value>("DELETE", "/vm/migration", None) {
                eprintln!("livemig: {e}");
            }
        }
        if let Ok(Some(p)) = client.call::<Option<Progress>>("GET", "/vm/migration", None) {
            bar.show(&p);
        }
    }
    bar.finish();
    let report = worker
        .join()
        .map_err(|_| "the migrate request thread panicked")??;
    if let Some(p) = report_path {
        std::fs::write(&p, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(report)
}

/// A progress bar on a terminal; a line per phase otherwise.
struct ProgressView {
    bar: Option<indicatif::ProgressBar>,
    last_phase: Mutex<String>,
}

impl ProgressView {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {msg:12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        });
        ProgressView {
            bar,
            last_phase: Mutex::new(String::new()),
        }
    }

    fn show(&self, p: &Progress) {
        let mut last = locks::lock(&self.last_phase);
        match &self.bar {
            Some(b) => {
                b.set_length(p.ram_bytes);
                b.set_position(p.bytes_on_wire.min(p.ram_bytes));
                b.set_message(format!("{} r{}", p.phase, p.round));
            }
            None if p.phase != *last => eprintln!(
                "migration: {} (round {}, {} MiB sent)",
                p.phase,
                p.round,
                p.bytes_on_wire >> 20
            ),
            None => {}
        }
        last.clone_from(&p.phase);
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
