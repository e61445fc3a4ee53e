//! `livemig migrate` and the migration routes of a VM's API.
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use migration::{MigrateRequest, Progress, Report};
use serde_json::json;
use vmm::api::{Client, Extension};
use vmm::Vm;

/// `POST /vm/migrate` with a [`MigrateRequest`] runs a migration and answers with its report;
/// `GET /vm/migration` tells where a running one is.
pub fn api_extension() -> Extension {
    let progress: Arc<Mutex<Option<Progress>>> = Arc::new(Mutex::new(None));
    Arc::new(
        move |method: &str, url: &str, body: &[u8], vm: &Arc<Mutex<Vm>>| match (method, url) {
            ("POST", "/vm/migrate") => Some(migrate_route(body, vm, &progress)),
            ("GET", "/vm/migration") => Some(Ok(json!(*locks::lock(&progress)))),
            _ => None,
        },
    )
}

fn migrate_route(
    body: &[u8],
    vm: &Arc<Mutex<Vm>>,
    progress: &Arc<Mutex<Option<Progress>>>,
) -> Result<serde_json::Value, (u16, String)> {
    let req: MigrateRequest = serde_json::from_slice(body).map_err(|e| {
        (
            400,
            format!("migrate needs {{\"to\": \"HOST:PORT\", ...}}: {e}"),
        )
    })?;
    let opts = req.options().map_err(|e| (400, e))?;
    let p = progress.clone();
    let report = migration::migrate(vm, &opts, &move |pr: &Progress| {
        *locks::lock(&p) = Some(pr.clone());
    })
    .map_err(|e| (500, e.to_string()))?;
    serde_json::to_value(&report).map_err(|e| (500, e.to_string()))
}

/// `livemig migrate`: asks the source VM's process to migrate, shows progress, prints the
/// summary; fails unless the guest verified on the destination (a foreign guest, which cannot
/// verify itself, is not a failure).
pub fn main(
    api: &Path,
    req: MigrateRequest,
    report: Option<PathBuf>,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let r = migrate(api, req, report)?;
    println!("{}", r.summary());
    let unverifiable = r
        .guest_verify
        .as_deref()
        .is_some_and(|d| d.starts_with("not verifiable"));
    Ok(if r.guest_verified || unverifiable {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Client side: runs the request, showing progress from `GET /vm/migration` meanwhile.
pub fn migrate(
    api: &Path,
    req: MigrateRequest,
    report_path: Option<PathBuf>,
) -> Result<Report, Box<dyn std::error::Error>> {
    let body = serde_json::to_value(&req)?;
    let worker = {
        let api = api.to_path_buf();
        std::thread::spawn(move || {
            Client::new(api)
                .with_timeout(Duration::from_secs(3600))
                .call::<Report>("POST", "/vm/migrate", Some(body))
        })
    };
    let bar = ProgressView::new();
    let client = Client::new(api);
    while !worker.is_finished() {
        std::thread::sleep(Duration::from_millis(200));
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
