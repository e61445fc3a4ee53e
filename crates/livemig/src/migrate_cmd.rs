//! `livemig migrate` and the migration routes of a VM's API: one migration per VM at a time,
//! cancellable until its switchover, and cancelled if the client that started it goes away.
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use migration::{Cancel, MigrateRequest, Progress, Report};
use serde_json::json;
use transport::Security;
use vmm::api::{Client, Extension};
use vmm::Vm;

/// The migration in flight on a VM.
struct Running {
    to: String,
    cancel: Cancel,
    /// Its pace, when it has one: `PATCH /vm/migration` changes it.
    limit: Option<Arc<transport::RateLimit>>,
    /// Its deadline on progress, which bounds how slow a pace may be.
    peer_timeout: Duration,
    /// Set when the client holds a lease: it must ask for progress this often.
    lease: Option<Duration>,
    renewed: Instant,
}

#[derive(Default)]
struct Slot {
    running: Option<Running>,
    progress: Option<Progress>,
    /// A sample holds the dirty log: no migration meanwhile.
    sampling: bool,
}

/// | method | path            | body                 | answer                                   |
/// |--------|-----------------|----------------------|------------------------------------------|
/// | POST   | /vm/migrate     | [`MigrateRequest`]   | the report; 409 if one is under way; 502 if the switchover's outcome is unknown (VM paused) |
/// | GET    | /vm/migration   |                      | [`Progress`] (renews the client's lease) |
/// | DELETE | /vm/migration   |                      | cancels; 409 past the point of no return |
/// | PATCH  | /vm/migration   | `{"max_bandwidth"}`  | re-paces the migration under way         |
/// | POST   | /vm/sample      | `{"ms": N, "fingerprint": B}` | `migration::sample::VmSample`: touched, zero, compress, dirty rate, content fingerprint, what a rewritten page costs as a delta |
///
/// `default_security`: the credentials of this VM process, for requests that bring none.
pub fn api_extension(default_security: Option<Security>) -> Extension {
    let slot: Arc<Mutex<Slot>> = Arc::default();
    Arc::new(
        move |method: &str, url: &str, body: &[u8], vm: &Arc<Mutex<Vm>>| match (method, url) {
            ("POST", "/vm/migrate") => {
                Some(migrate_route(body, vm, &slot, default_security.as_ref()))
            }
            ("GET", "/vm/migration") => Some(Ok(progress_route(&slot))),
            ("DELETE", "/vm/migration") => Some(cancel_route(&slot)),
            ("PATCH", "/vm/migration") => Some(pace_route(body, &slot)),
            ("POST", "/vm/sample") => Some(sample_route(body, vm, &slot)),
            (_, "/vm/migrate" | "/vm/migration") => {
                Some(Err((405, format!("{method} is not allowed on {url}"))))
            }
            _ => None,
        },
    )
}

fn migrate_route(
    body: &[u8],
    vm: &Arc<Mutex<Vm>>,
    slot: &Arc<Mutex<Slot>>,
    default_security: Option<&Security>,
) -> Result<serde_json::Value, (u16, String)> {
    let req: MigrateRequest = serde_json::from_slice(body).map_err(|e| {
        (
            400,
            format!("migrate needs {{\"to\": \"HOST:PORT\", ...}}: {e}"),
        )
    })?;
    let mut opts = req.options().map_err(|e| (400, e.to_string()))?;
    opts.security = req
        .security(default_security)
        .map_err(|e| (400, e.to_string()))?;
    opts.limit = opts
        .max_bandwidth
        .map(|b| Arc::new(transport::RateLimit::new(b)));
    {
        let mut s = locks::lock(slot);
        if s.sampling {
            return Err((
                409,
                "this VM is being sampled; migrate it in a moment".into(),
            ));
        }
        if let Some(r) = &s.running {
            return Err((
                409,
                format!(
                    "a migration of this VM to {} is already under way; cancel it with `livemig migrate --cancel` (DELETE /vm/migration) first",
                    r.to
                ),
            ));
        }
        s.running = Some(Running {
            to: req.to.clone(),
            cancel: opts.cancel.clone(),
            limit: opts.limit.clone(),
            peer_timeout: opts.peer_timeout,
            lease: req.lease_ms.map(Duration::from_millis),
            renewed: Instant::now(),
        });
        s.progress = None;
    }
    if let Some(lease) = req.lease_ms.map(Duration::from_millis) {
        watch_lease(slot.clone(), opts.cancel.clone(), lease);
    }
    let p = slot.clone();
    let result = migration::migrate(vm, &opts, &move |pr: &Progress| {
        locks::lock(&p).progress = Some(pr.clone());
    });
    {
        // What progress says from now on: how the migration ended.
        let mut s = locks::lock(slot);
        s.running = None;
        let last = s.progress.take().unwrap_or_default();
        s.progress = Some(Progress::ended(last, &result));
    }
    let report = result.map_err(|e| {
        let status = match e {
            // The destination's answer was lost; the VM stays paused here (see the error).
            migration::MigrationError::OutcomeUnknown(_) => 502,
            // The destination could not take it now; a later attempt may succeed.
            migration::MigrationError::Busy { .. } => 503,
            _ => 500,
        };
        (status, e.to_string())
    })?;
    serde_json::to_value(&report).map_err(|e| (500, e.to_string()))
}

/// Cancels the migration if its client stops renewing its lease (it died, or lost its way
/// to this socket): a migration nobody waits for is not left to run.
fn watch_lease(slot: Arc<Mutex<Slot>>, cancel: Cancel, lease: Duration) {
    let spawned = std::thread::Builder::new()
        .name("lease".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(100));
            let s = locks::lock(&slot);
            let Some(r) = s.running.as_ref().filter(|_| !cancel.requested()) else {
                return;
            };
            if r.renewed.elapsed() > lease {
                let why = format!(
                    "the client that started it went away (no word for {:.1} s)",
                    lease.as_secs_f64()
                );
                drop(s);
                let _ = cancel.request(&why);
                return;
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no lease watcher for the migration: {e}");
    }
}

fn progress_route(slot: &Arc<Mutex<Slot>>) -> serde_json::Value {
    let mut s = locks::lock(slot);
    if let Some(r) = s.running.as_mut().filter(|r| r.lease.is_some()) {
        r.renewed = Instant::now();
    }
    json!(s.progress)
}

fn cancel_route(slot: &Arc<Mutex<Slot>>) -> Result<serde_json::Value, (u16, String)> {
    let s = locks::lock(slot);
    let r = s
        .running
        .as_ref()
        .ok_or((404, "no migration of this VM is under way".to_string()))?;
    r.cancel
        .request("cancelled through the API")
        .map_err(|e| (409, e.to_string()))?;
    Ok(json!({ "cancelled": true, "to": r.to }))
}

#[derive(serde::Deserialize)]
struct Pace {
    max_bandwidth: u64,
}

fn pace_route(body: &[u8], slot: &Arc<Mutex<Slot>>) -> Result<serde_json::Value, (u16, String)> {
    let p: Pace = serde_json::from_slice(body).map_err(|e| {
        (
            400,
            format!("pace needs {{\"max_bandwidth\": BITS_PER_S}}: {e}"),
        )
    })?;
    let s = locks::lock(slot);
    let r = s
        .running
        .as_ref()
        .ok_or((404, "no migration of this VM is under way".to_string()))?;
    let limit = r.limit.as_ref().ok_or((
        409,
        "this migration runs without a pace (start it with max_bandwidth)".to_string(),
    ))?;
    migration::request::check_bandwidth(p.max_bandwidth, r.peer_timeout)
        .map_err(|e| (400, e.to_string()))?;
    limit.set_bits_per_sec(p.max_bandwidth);
    Ok(json!({ "max_bandwidth": p.max_bandwidth }))
}

#[derive(serde::Deserialize, Default)]
struct SampleRequest {
    ms: Option<u64>,
    /// Also the content fingerprint (reads every touched page).
    #[serde(default)]
    fingerprint: bool,
}

fn sample_route(
    body: &[u8],
    vm: &Arc<Mutex<Vm>>,
    slot: &Arc<Mutex<Slot>>,
) -> Result<serde_json::Value, (u16, String)> {
    let r: SampleRequest = if body.iter().all(u8::is_ascii_whitespace) {
        SampleRequest::default()
    } else {
        serde_json::from_slice(body).map_err(|e| (400, e.to_string()))?
    };
    {
        let mut s = locks::lock(slot);
        if s.running.is_some() || s.sampling {
            return Err((409, "a migration or sample of this VM is under way".into()));
        }
        s.sampling = true;
    }
    let window = Duration::from_millis(r.ms.unwrap_or(500).clamp(50, 10_000));
    let sampled = migration::sample::sample(vm, window, r.fingerprint);
    locks::lock(slot).sampling = false;
    let s = sampled.map_err(|e| (409, e.to_string()))?;
    serde_json::to_value(&s).map_err(|e| (500, e.to_string()))
}

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
