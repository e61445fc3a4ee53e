//! The migration's endpoints of a VM's API, served beside the VMM's own: one migration per VM
//! at a time, cancellable until its switchover, cancelled if the client that started it goes
//! away, re-paced within what the protocol's deadlines allow, and sampled for a drain.
//!
//! | method | path            | body                 | answer                                   |
//! |--------|-----------------|----------------------|------------------------------------------|
//! | POST   | /vm/migrate     | [`MigrateRequest`]   | the [`Report`]; 409 if one is under way; 502 if the switchover's outcome is unknown (VM paused); 503 if the destination is busy |
//! | GET    | /vm/migration   |                      | [`Progress`] (renews the client's lease); once it ended, how |
//! | DELETE | /vm/migration   |                      | cancels; 409 past the point of no return |
//! | PATCH  | /vm/migration   | [`Pace`]             | re-paces the migration under way; 400 below the minimum |
//! | POST   | /vm/migration/resume | [`ResumeRequest`] | makes post-copy's failed link again at once (to `to` if given), with a new recovery window; 409 unless post-copy is paused |
//! | POST   | /vm/sample      | [`SampleRequest`]    | [`crate::sample::VmSample`]              |
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use transport::{RateLimit, Security};
use unixhttp::{Reply, Request};

use crate::send::Resume;
use crate::{Cancel, MigrateRequest, MigrationError, Progress, Report, SourceVm};

/// The migration in flight on a VM.
struct Running {
    to: String,
    cancel: Cancel,
    resume: Resume,
    /// Its pace, when it has one: `PATCH /vm/migration` changes it.
    limit: Option<Arc<RateLimit>>,
    /// Raw batches only while set (`PATCH /vm/migration {"codec": "raw"}`).
    hold_raw: Arc<std::sync::atomic::AtomicBool>,
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

/// `PATCH /vm/migration`'s body: the new pace, bits/s, and/or how compressed batches go.
#[derive(Serialize, Deserialize, Default)]
pub struct Pace {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codec: Option<CodecMode>,
}

/// How a compressed migration's batches go from now on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodecMode {
    /// As its codec policy chooses.
    Auto,
    /// Raw, whatever the policy says.
    Raw,
}

/// `POST /vm/migration/resume`'s body.
#[derive(Serialize, Deserialize, Default)]
pub struct ResumeRequest {
    /// Another address of the destination's receiver (HOST:PORT), on a path that works.
    #[serde(default)]
    pub to: Option<String>,
}

/// `POST /vm/sample`'s body.
#[derive(Serialize, Deserialize, Default)]
pub struct SampleRequest {
    /// The window, in milliseconds (default 500).
    pub ms: Option<u64>,
    /// Also the content fingerprint (reads every touched page).
    #[serde(default)]
    pub fingerprint: bool,
}

/// An endpoint's failure: an HTTP status and what to tell the client.
pub type Failure = (u16, String);

/// The migration endpoints of one VM.
pub struct MigrationRoutes {
    vm: Arc<SourceVm>,
    /// The credentials of this VM's process, for requests that bring none.
    security: Option<Security>,
    slot: Arc<Mutex<Slot>>,
}

impl MigrationRoutes {
    pub fn new(vm: Arc<SourceVm>, security: Option<Security>) -> Arc<Self> {
        Arc::new(MigrationRoutes {
            vm,
            security,
            slot: Arc::default(),
        })
    }

    /// Runs a migration to its end (its report), unless one or a sample is under way.
    pub fn migrate(&self, req: &MigrateRequest) -> Result<Report, Failure> {
        let mut opts = req.options().map_err(|e| (400, e.to_string()))?;
        opts.security = Some(
            req.security(self.security.as_ref())
                .map_err(|e| (400, e.to_string()))?,
        );
        opts.limit = opts.max_bandwidth.map(|b| Arc::new(RateLimit::new(b)));
        self.take_slot(req, &opts)?;
        if let Some(lease) = req.lease_ms.map(Duration::from_millis) {
            watch_lease(self.slot.clone(), opts.cancel.clone(), lease);
        }
        let p = self.slot.clone();
        let result = crate::migrate(&self.vm, &opts, &move |pr: &Progress| {
            locks::lock(&p).progress = Some(pr.clone());
        });
        {
            // What progress says from now on: how the migration ended.
            let mut s = locks::lock(&self.slot);
            s.running = None;
            let last = s.progress.take().unwrap_or_default();
            s.progress = Some(Progress::ended(last, &result));
        }
        result.map_err(|e| {
            let status = match e {
                // The destination's answer was lost; the VM stays paused here (see the error).
                MigrationError::OutcomeUnknown(_) => 502,
                // The destination could not take it now; a later attempt may succeed.
                MigrationError::Busy { .. } => 503,
                _ => 500,
            };
            (status, e.to_string())
        })
    }

    fn take_slot(&self, req: &MigrateRequest, opts: &crate::MigrateOptions) -> Result<(), Failure> {
        let mut s = locks::lock(&self.slot);
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
            resume: opts.resume.clone(),
            limit: opts.limit.clone(),
            hold_raw: opts.hold_raw.clone(),
            peer_timeout: opts.peer_timeout,
            lease: req.lease_ms.map(Duration::from_millis),
            renewed: Instant::now(),
        });
        s.progress = None;
        Ok(())
    }

    /// Where the migration is (renewing its client's lease), or how the last one ended.
    pub fn progress(&self) -> Option<Progress> {
        let mut s = locks::lock(&self.slot);
        if let Some(r) = s.running.as_mut().filter(|r| r.lease.is_some()) {
            r.renewed = Instant::now();
        }
        s.progress.clone()
    }

    /// Cancels the migration under way; where it was going.
    pub fn cancel(&self) -> Result<String, Failure> {
        let s = locks::lock(&self.slot);
        let r = s
            .running
            .as_ref()
            .ok_or((404, "no migration of this VM is under way".to_string()))?;
        r.cancel
            .request("cancelled through the API")
            .map_err(|e| (409, e.to_string()))?;
        Ok(r.to.clone())
    }

    /// Makes the failed post-copy link of the migration under way again at once; where it goes.
    pub fn resume(&self, req: &ResumeRequest) -> Result<String, Failure> {
        let s = locks::lock(&self.slot);
        let r = s
            .running
            .as_ref()
            .ok_or((404, "no migration of this VM is under way".to_string()))?;
        if let Some(to) = &req.to {
            check_address(to).map_err(|e| (400, e))?;
        }
        r.resume
            .request(req.to.clone())
            .map_err(|e| (409, e.to_string()))?;
        Ok(req.to.clone().unwrap_or_else(|| r.to.clone()))
    }

    /// Re-paces the migration under way (refused below what its peer timeout allows), and
    /// holds its batches raw or lets its codec policy choose again.
    pub fn pace(&self, p: &Pace) -> Result<(), Failure> {
        let s = locks::lock(&self.slot);
        let r = s
            .running
            .as_ref()
            .ok_or((404, "no migration of this VM is under way".to_string()))?;
        if let Some(bits) = p.max_bandwidth {
            let limit = r.limit.as_ref().ok_or((
                409,
                "this migration runs without a pace (start it with max_bandwidth)".to_string(),
            ))?;
            crate::request::check_bandwidth(bits, r.peer_timeout)
                .map_err(|e| (400, e.to_string()))?;
            limit.set_bits_per_sec(bits);
        }
        if let Some(c) = p.codec {
            r.hold_raw
                .store(c == CodecMode::Raw, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// Samples the VM for a drain, unless a migration or a sample is under way.
    pub fn sample(&self, r: &SampleRequest) -> Result<crate::sample::VmSample, Failure> {
        {
            let mut s = locks::lock(&self.slot);
            if s.running.is_some() || s.sampling {
                return Err((409, "a migration or sample of this VM is under way".into()));
            }
            s.sampling = true;
        }
        let window = Duration::from_millis(r.ms.unwrap_or(500).clamp(50, 10_000));
        let sampled = crate::sample::sample(&self.vm, window, r.fingerprint);
        locks::lock(&self.slot).sampling = false;
        sampled.map_err(|e| (409, e.to_string()))
    }
}

impl unixhttp::Routes for MigrationRoutes {
    fn route(&self, r: &Request) -> Option<Reply> {
        let reply = match (r.method.as_str(), r.path.as_str()) {
            ("POST", "/vm/migrate") => {
                body::<MigrateRequest>(r, "migrate", "{\"to\": \"HOST:PORT\", ...}")
                    .and_then(|req| self.migrate(&req))
                    .and_then(|rep| unixhttp::reply(&rep))
            }
            ("GET", "/vm/migration") => unixhttp::reply(&self.progress()),
            ("DELETE", "/vm/migration") => self
                .cancel()
                .map(|to| serde_json::json!({ "cancelled": true, "to": to })),
            ("PATCH", "/vm/migration") => body::<Pace>(
                r,
                "pace",
                "{\"max_bandwidth\": BITS_PER_S} and/or {\"codec\": \"raw\"|\"auto\"}",
            )
            .and_then(|p| {
                self.pace(&p)?;
                Ok(serde_json::json!(p))
            }),
            ("POST", "/vm/migration/resume") => r
                .json::<ResumeRequest>()
                .and_then(|req| self.resume(&req))
                .map(|to| serde_json::json!({ "resumed": true, "to": to })),
            ("POST", "/vm/sample") => r
                .json::<SampleRequest>()
                .and_then(|s| self.sample(&s))
                .and_then(|v| unixhttp::reply(&v)),
            (m, p @ ("/vm/migrate" | "/vm/migration" | "/vm/migration/resume" | "/vm/sample")) => {
                Err((405, format!("{m} is not allowed on {p}")))
            }
            _ => return None,
        };
        Some(reply)
    }
}

/// `HOST:PORT`, or a 400's reason.
fn check_address(to: &str) -> Result<(), String> {
    match to.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty() && to.len() <= 255 && port.parse::<u16>().is_ok() =>
        {
            Ok(())
        }
        _ => Err(format!("{to:?} is not HOST:PORT")),
    }
}

/// A request's JSON body as `T`; a 400 that says what `what` needs otherwise.
fn body<T: serde::de::DeserializeOwned>(
    r: &Request,
    what: &str,
    expected: &str,
) -> Result<T, Failure> {
    serde_json::from_slice(&r.body).map_err(|e| (400, format!("{what} needs {expected}: {e}")))
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
