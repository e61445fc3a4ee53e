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
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::devices::GuestReport;
use crate::snapshot::{self, SnapshotStats};
use crate::vm::{RunState, Vm};

/// Largest request or response body we accept.
const MAX_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("binding the API socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("connecting to the API socket {path}: {source} (is the VM running?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} sent a malformed HTTP response: {why}")]
    BadResponse { path: PathBuf, why: String },
    #[error("the VM refused {what}: {message} (HTTP {status})")]
    Refused {
        what: String,
        status: u16,
        message: String,
    },
}

#[derive(Serialize, Deserialize)]
struct ErrorBody {
    error: String,
}

#[derive(Deserialize, Default)]
struct VerifyRequest {
    timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
struct SnapshotRequest {
    dir: PathBuf,
}

/// Routes served by a layer above the VMM (migration); `None` = not mine.
pub type Extension = Arc<
    dyn Fn(&str, &str, &[u8], &Arc<Mutex<Vm>>) -> Option<Result<serde_json::Value, (u16, String)>>
        + Send
        + Sync,
>;

/// Serves the API for one VM until dropped or `/vm/shutdown`. Each request gets its own
/// thread, so status stays answerable during a long call (a migration).
pub struct ApiServer {
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
    shutdown: Arc<AtomicBool>,
}

impl ApiServer {
    pub fn start(
        path: &Path,
        vm: Arc<Mutex<Vm>>,
        ext: Option<Extension>,
    ) -> Result<Self, ApiError> {
        // A stale socket from a dead process would make bind fail.
        if path.exists() && UnixStream::connect(path).is_err() {
            let _ = std::fs::remove_file(path);
        }
        let server =
            Arc::new(
                tiny_http::Server::http_unix(path).map_err(|source| ApiError::Bind {
                    path: path.to_path_buf(),
                    source,
                })?,
            );
        let shutdown = Arc::new(AtomicBool::new(false));
        let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (srv, flag, busy) = (server.clone(), shutdown.clone(), in_flight.clone());
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for req in srv.incoming_requests() {
                    let (vm, flag, ext, busy) =
                        (vm.clone(), flag.clone(), ext.clone(), busy.clone());
                    busy.fetch_add(1, Ordering::SeqCst);
                    let spawned =
                        std::thread::Builder::new()
                            .name("api-req".into())
                            .spawn(move || {
                                handle(req, &vm, &flag, ext.as_ref());
                                busy.fetch_sub(1, Ordering::SeqCst);
                            });
                    if spawned.is_err() {
                        tracing::error!("no thread for an API request");
                    }
                }
            })
            .map_err(|e| ApiError::Bind {
                path: path.to_path_buf(),
                source: Box::new(e),
            })?;
        Ok(ApiServer {
            in_flight,
            server,
            thread: Some(thread),
            path: path.to_path_buf(),
            shutdown,
        })
    }

    /// Requests being answered right now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// True once a client asked the VM to shut down.
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn respond(req: tiny_http::Request, status: u16, body: serde_json::Value) {
    let data = serde_json::to_vec(&body).expect("JSON values serialise");
    // Always Content-Length: tiny_http would chunk bodies over 32 KiB (a long migration's
    // report is bigger), and a plain length is simpler for every client.
    let resp = tiny_http::Response::from_data(data)
        .with_chunked_threshold(usize::MAX)
        .with_status_code(status)
        .with_header(
            tiny_http::Header::from_bytes("Content-Type", "application/json")
                .expect("static header is valid"),
        );
    let _ = req.respond(resp);
}

fn handle(
    mut req: tiny_http::Request,
    vm: &Arc<Mutex<Vm>>,
    shutdown: &AtomicBool,
    ext: Option<&Extension>,
) {
    let mut body = Vec::new();
    if req
        .as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
        .is_err()
        || body.len() > MAX_BODY
    {
        return respond(
            req,
            400,
            json!({"error": "request body unreadable or over 1 MiB"}),
        );
    }
    let method = req.method().as_str().to_string();
    let url = req.url().to_string();
    let result = match ext.and_then(|f| f(&method, &url, &body, vm)) {
        Some(r) => r,
        None => route(&method, &url, &body, vm, shutdown),
    };
    match result {
        Ok(v) => respond(req, 200, v),
        Err((status, msg)) => respond(req, status, json!({ "error": msg })),
    }
}

fn parse<'a, T: Deserialize<'a> + Default>(body: &'a [u8]) -> Result<T, (u16, String)> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| (400, format!("bad JSON body: {e}")))
}

fn route(
    method: &str,
    url: &str,
    body: &[u8],
    vm: &Mutex<Vm>,
    shutdown: &AtomicBool,
) -> Result<serde_json::Value, (u16, String)> {
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
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Client {
            path: path.into(),
            timeout: Duration::from_secs(120),
        }
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

    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
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
        let ioe = |source| ApiError::Io {
            path: self.path.clone(),
            source,
        };
        let mut s = UnixStream::connect(&self.path).map_err(|source| ApiError::Connect {
            path: self.path.clone(),
            source,
        })?;
        s.set_read_timeout(Some(self.timeout)).map_err(ioe)?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).map_err(ioe)?;
        let mut raw = Vec::new();
        s.take(MAX_BODY as u64 * 4)
            .read_to_end(&mut raw)
            .map_err(ioe)?;
        let bad = |why: String| ApiError::BadResponse {
            path: self.path.clone(),
            why,
        };
        let (status, payload) = parse_response(&raw).map_err(bad)?;
        let payload = &payload[..];
        if status != 200 {
            let message = serde_json::from_slice::<ErrorBody>(payload)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(payload).into_owned());
            return Err(ApiError::Refused {
                what: format!("{method} {path}"),
                status,
                message,
            });
        }
        serde_json::from_slice(payload)
            .map_err(|e| bad(format!("body is not the expected JSON: {e}")))
    }
}

/// An HTTP/1.1 response read to its end: status and body, whether sent with a length or
/// chunked.
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("truncated response head".into()),
        Err(e) => return Err(e.to_string()),
    };
    let status = resp.code.unwrap_or(0);
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let rest = &raw[head_len..];
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        return dechunk(rest).map(|b| (status, b));
    }
    match header("content-length") {
        Some(v) => {
            let len: usize = v.parse().map_err(|_| format!("bad Content-Length {v:?}"))?;
            if rest.len() < len {
                return Err(format!("body cut short: {} of {len} bytes", rest.len()));
            }
            Ok((status, rest[..len].to_vec()))
        }
        None => Ok((status, rest.to_vec())),
    }
}

/// Decodes a chunked body: hex size line, data, CRLF, ... until the zero-size chunk.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunked body cut short (no size line)")?;
        let line = String::from_utf8_lossy(&rest[..eol]);
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size + 2 {
            return Err("chunked body cut short (in a chunk)".into());
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_with_a_length_or_chunked_parse_alike() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{\"a\":1}";
        assert_eq!(parse_response(plain).unwrap(), (200, b"{\"a\":1}".to_vec()));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked).unwrap(),
            (200, b"{\"a\":1}".to_vec())
        );
        let short = b"HTTP/1.1 200 OK\r\nContent-Length: 70\r\n\r\n{}";
        assert!(parse_response(short).unwrap_err().contains("cut short"));
        let cut = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc";
        assert!(parse_response(cut).unwrap_err().contains("cut short"));
        assert!(parse_response(b"HTTP/1.1 200").is_err());
    }
}
