//! Control API: HTTP/JSON on a unix socket (as Firecracker and Cloud Hypervisor do).
//!
//! | method | path            | body                    | answer                     |
//! |--------|-----------------|-------------------------|----------------------------|
//! | GET    | /vm             |                         | [`VmStatus`]               |
//! | POST   | /vm/pause       |                         | [`VmStatus`]               |
//! | POST   | /vm/resume      |                         | [`VmStatus`]               |
//! | POST   | /vm/verify      | `{"timeout_ms": N}`     | the guest's [`GuestReport`]|
//! | POST   | /vm/snapshot    | `{"dir": "PATH"}`       | [`SnapshotStats`]          |
//! | POST   | /vm/shutdown    |                         | `{}`                       |
//!
//! The migration's endpoints (`/vm/migrate`, `/vm/migration`, `/vm/sample`) are the migration
//! engine's, served beside these.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
pub use unixhttp::ApiError;
use unixhttp::{Reply, Request};

use crate::devices::GuestReport;
use crate::snapshot::{self, SnapshotStats};
use crate::vm::{RunState, Vm};

#[derive(Deserialize, Default)]
struct VerifyRequest {
    timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
struct SnapshotRequest {
    dir: PathBuf,
}

/// The VMM's own endpoints of a VM's API (see the table above). Served beside others (the
/// migration's) by whoever runs the VM's process ([`unixhttp::serve_all`]); each request gets
/// its own thread, so status stays answerable during a long call.
pub struct VmRoutes {
    vm: Arc<Mutex<Vm>>,
    shutdown: AtomicBool,
}

impl VmRoutes {
    pub fn new(vm: Arc<Mutex<Vm>>) -> Arc<Self> {
        Arc::new(VmRoutes {
            vm,
            shutdown: AtomicBool::new(false),
        })
    }

    /// True once a client asked the VM to shut down.
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }
}

impl unixhttp::Routes for VmRoutes {
    fn route(&self, r: &Request) -> Option<Reply> {
        const MINE: [&str; 6] = [
            "/vm",
            "/vm/pause",
            "/vm/resume",
            "/vm/verify",
            "/vm/snapshot",
            "/vm/shutdown",
        ];
        MINE.contains(&r.path.as_str())
            .then(|| route(&r.method, &r.path, &r.body, &self.vm, &self.shutdown))
    }
}

fn parse<'a, T: Deserialize<'a> + Default>(body: &'a [u8]) -> Result<T, (u16, String)> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| (400, format!("bad JSON body: {e}")))
}

fn route(method: &str, url: &str, body: &[u8], vm: &Mutex<Vm>, shutdown: &AtomicBool) -> Reply {
    let lock = || locks::lock(vm);
    let err = |e: crate::vm::VmError| (409, e.to_string());
    match (method, url) {
        ("GET", "/vm") => Ok(js(&lock().status())),
        ("POST", "/vm/pause") => {
            let mut g = lock();
            g.pause().map_err(err)?;
            Ok(js(&g.status()))
        }
        ("POST", "/vm/resume") => {
            let mut g = lock();
            g.resume().map_err(err)?;
            Ok(js(&g.status()))
        }
        ("POST", "/vm/verify") => {
            let r: VerifyRequest = parse(body)?;
            let timeout = Duration::from_millis(r.timeout_ms.unwrap_or(30_000));
            let io = {
                let mut g = lock();
                if g.poll() != RunState::Running {
                    return Err((
                        409,
                        format!(
                            "the VM is {}, the guest can only verify while running",
                            g.poll()
                        ),
                    ));
                }
                g.io().clone()
            };
            match io.status.verify(timeout) {
                Some(r) => Ok(js(&r)),
                None => Err((
                    504,
                    format!("the guest did not report a verify result within {timeout:?}"),
                )),
            }
        }
        ("POST", "/vm/snapshot") => {
            let r: SnapshotRequest = serde_json::from_slice(body)
                .map_err(|e| (400, format!("snapshot needs {{\"dir\": PATH}}: {e}")))?;
            let mut g = lock();
            let was_running = g.poll() == RunState::Running;
            g.pause().map_err(err)?;
            let result = g.capture().map_err(err).and_then(|state| {
                snapshot::write(&r.dir, &state, g.ram()).map_err(|e| (500, e.to_string()))
            });
            if was_running {
                g.resume().map_err(err)?;
            }
            let stats: SnapshotStats = result?;
            Ok(js(&stats))
        }
        ("POST", "/vm/shutdown") => {
            shutdown.store(true, Ordering::SeqCst);
            Ok(json!({}))
        }
        (
            _,
            "/vm" | "/vm/pause" | "/vm/resume" | "/vm/verify" | "/vm/snapshot" | "/vm/shutdown",
        ) => Err((405, format!("{method} is not allowed on {url}"))),
        _ => Err((404, format!("no such endpoint: {method} {url}"))),
    }
}

fn js<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("API answers serialise")
}

/// A client for a VM's API socket.
pub struct Client(unixhttp::Client);

impl Client {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Client(unixhttp::Client::new(path))
    }

    pub fn status(&self) -> Result<crate::vm::VmStatus, ApiError> {
        self.call("GET", "/vm", None)
    }

    pub fn pause(&self) -> Result<crate::vm::VmStatus, ApiError> {
        self.call("POST", "/vm/pause", None)
    }

    pub fn resume(&self) -> Result<crate::vm::VmStatus, ApiError> {
        self.call("POST", "/vm/resume", None)
    }

    pub fn verify(&self, timeout: Duration) -> Result<GuestReport, ApiError> {
        self.call(
            "POST",
            "/vm/verify",
            Some(json!({"timeout_ms": timeout.as_millis() as u64})),
        )
    }

    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotStats, ApiError> {
        self.call("POST", "/vm/snapshot", Some(json!({ "dir": dir })))
    }

    pub fn with_timeout(self, t: Duration) -> Self {
        Client(self.0.with_timeout(t))
    }

    pub fn shutdown(&self) -> Result<serde_json::Value, ApiError> {
        self.call("POST", "/vm/shutdown", None)
    }

    /// One request/response over a fresh connection.
    pub fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, ApiError> {
        self.0.call(method, path, body)
    }
}
