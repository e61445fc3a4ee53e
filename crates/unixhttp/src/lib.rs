//! HTTP/JSON control APIs on unix sockets, as Firecracker and Cloud Hypervisor serve theirs:
//! a server that only its owner can reach and that no client can wear down, and its client.
//!
//! The server's socket is created 0600 (in a private directory, then moved into place, so it
//! never exists with wider rights), replaces only a stale socket, and answers one request per
//! connection: at most [`Limits::connections`] at once (more get 503), the request head and
//! body within [`Limits::read_timeout`] (a slow client gets 408), a body of at most
//! [`Limits::max_body`] (413), anything malformed 400. Bodies are JSON; errors are
//! `{"error": "..."}` with their status.
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ApiError {
    /// binding the API socket {path}: {why}
    Bind { path: PathBuf, why: String },
    /// connecting to the API socket {path}: {source} (is it running?)
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    /// talking to {path}: {source}
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// {path} sent a malformed HTTP response: {why}
    BadResponse { path: PathBuf, why: String },
    /// {what} was refused: {message} (HTTP {status})
    Refused {
        what: String,
        status: u16,
        message: String,
    },
}

impl ApiError {
    /// The HTTP status of a refusal (None for any other failure).
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct ErrorBody {
    error: String,
}

/// One request, read whole.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

impl Request {
    /// The body as `T`; an empty body is `T::default()`.
    pub fn json<'a, T: Deserialize<'a> + Default>(&'a self) -> Result<T, (u16, String)> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(T::default());
        }
        serde_json::from_slice(&self.body).map_err(|e| (400, format!("bad JSON body: {e}")))
    }
}

/// A route's answer: a JSON value, or an HTTP status and why.
pub type Reply = Result<serde_json::Value, (u16, String)>;
pub type Handler = Arc<dyn Fn(&Request) -> Reply + Send + Sync>;

/// A set of endpoints, each parsing its request into the type it takes: answers the requests
/// it knows, and None for the others.
pub trait Routes: Send + Sync {
    fn route(&self, r: &Request) -> Option<Reply>;
}

/// One handler for several sets of endpoints on one socket: the first that knows a request
/// answers it; 404 when none does.
pub fn serve_all(routes: Vec<Arc<dyn Routes>>) -> Handler {
    Arc::new(move |r: &Request| {
        routes
            .iter()
            .find_map(|set| set.route(r))
            .unwrap_or_else(|| Err((404, format!("no such endpoint: {} {}", r.method, r.path))))
    })
}

/// A reply's value: what a route answers with.
pub fn reply<T: Serialize>(v: &T) -> Reply {
    serde_json::to_value(v).map_err(|e| (500, format!("serialising the answer: {e}")))
}

/// What one client may cost the server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub connections: usize,
    pub read_timeout: Duration,
    pub max_body: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: 32,
            read_timeout: Duration::from_secs(5),
            max_body: 1 << 20,
        }
    }
}

const MAX_HEAD: usize = 16 << 10;

/// Serves a handler on a unix socket until dropped.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(path: &Path, handler: Handler, limits: Limits) -> Result<Self, ApiError> {
        let listener = bind_private(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (s, n) = (stop.clone(), in_flight.clone());
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || accept_loop(&listener, &handler, limits, &s, &n))
            .map_err(|e| ApiError::Bind {
                path: path.to_path_buf(),
                why: e.to_string(),
            })?;
        Ok(Server {
            path: path.to_path_buf(),
            stop,
            in_flight,
            thread: Some(thread),
        })
    }

    /// Requests being answered right now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees the flag.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path` as a socket only its owner can use. An existing socket nobody serves is
/// replaced; a served one, or anything that is not a socket, is refused.
pub fn bind_private(path: &Path) -> Result<UnixListener, ApiError> {
    let refuse = |why: String| ApiError::Bind {
        path: path.to_path_buf(),
        why,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(refuse(
                "it exists and is not a socket; refusing to replace it".into(),
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(refuse("another process serves it".into()));
        }
        std::fs::remove_file(path)
            .map_err(|e| refuse(format!("removing the stale socket: {e}")))?;
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| refuse("no file name".into()))?;
    // Bound in a private directory, made 0600 there, then moved into place: the socket never
    // exists under `path` with wider rights, whatever the umask.
    let private = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::create_dir(&private).map_err(|e| refuse(e.to_string()))?;
    let result = (|| {
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))?;
        let tmp = private.join("s");
        let l = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        Ok::<_, std::io::Error>(l)
    })();
    let _ = std::fs::remove_dir_all(&private);
    result.map_err(|e| refuse(e.to_string()))
}

fn accept_loop(
    listener: &UnixListener,
    handler: &Handler,
    limits: Limits,
    stop: &AtomicBool,
    in_flight: &Arc<AtomicUsize>,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut conn) = conn else { continue };
        if in_flight.fetch_add(1, Ordering::SeqCst) >= limits.connections {
            in_flight.fetch_sub(1, Ordering::SeqCst);
            let _ = conn.set_write_timeout(Some(Duration::from_millis(100)));
            respond(
                &mut conn,
                503,
                &error_body("too many API connections; try again"),
            );
            continue;
        }
        let (h, n) = (handler.clone(), in_flight.clone());
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || {
                serve_one(conn, &h, limits);
                n.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn error_body(msg: &str) -> serde_json::Value {
    serde_json::json!({ "error": msg })
}

/// Reads one request (within the limits), answers it, closes.
fn serve_one(mut conn: UnixStream, handler: &Handler, limits: Limits) {
    let reply = match read_request(&mut conn, limits) {
        Ok(req) => handler(&req),
        Err(e) => Err(e),
    };
    let _ = conn.set_write_timeout(Some(limits.read_timeout));
    match reply {
        Ok(v) => respond(&mut conn, 200, &v),
        Err((status, msg)) => respond(&mut conn, status, &error_body(&msg)),
    }
}

/// The request head and its body, all within the read deadline.
fn read_request(conn: &mut UnixStream, limits: Limits) -> Result<Request, (u16, String)> {
    let deadline = Instant::now() + limits.read_timeout;
    let mut buf = Vec::with_capacity(1024);
    let (head_len, method, path, body_len) = loop {
        read_some(conn, &mut buf, deadline, MAX_HEAD)?;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => {
                let len = content_length(req.headers)?;
                if len > limits.max_body {
                    return Err((
                        413,
                        format!(
                            "a body of {len} bytes is over the {} byte limit",
                            limits.max_body
                        ),
                    ));
                }
                let method = req.method.unwrap_or("").to_string();
                break (n, method, req.path.unwrap_or("").to_string(), len);
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => return Err((431, "request head over 16 KiB".into())),
            Err(e) => return Err((400, format!("malformed request: {e}"))),
        }
    };
    while buf.len() < head_len + body_len {
        read_some(conn, &mut buf, deadline, head_len + body_len)?;
    }
    buf.truncate(head_len + body_len);
    Ok(Request {
        method,
        path,
        body: buf.split_off(head_len),
    })
}

/// Reads more into `buf` (up to `cap` bytes in all) before `deadline`.
fn read_some(
    conn: &mut UnixStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
    cap: usize,
) -> Result<(), (u16, String)> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err((408, "request not complete within the read timeout".into()));
    }
    conn.set_read_timeout(Some(left))
        .map_err(|e| (500, e.to_string()))?;
    let mut chunk = [0u8; 4096];
    let want = cap.saturating_sub(buf.len()).clamp(1, chunk.len());
    match conn.read(&mut chunk[..want]) {
        Ok(0) => Err((400, "the request ended early".into())),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err((408, "request not complete within the read timeout".into()))
        }
        Err(e) => Err((400, e.to_string())),
    }
}

fn content_length(headers: &[httparse::Header<'_>]) -> Result<usize, (u16, String)> {
    if headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
    {
        return Err((
            411,
            "chunked request bodies are not taken; send Content-Length".into(),
        ));
    }
    match headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
    {
        None => Ok(0),
        Some(h) => std::str::from_utf8(h.value)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .ok_or((400, "bad Content-Length".into())),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// Writes a response with its length (never chunked), then ends the connection so the client
/// reads all of it: what it sent and we did not read (a refused body) is drained, briefly,
/// since closing on unread data would reset the connection under the response.
fn respond(conn: &mut UnixStream, status: u16, body: &serde_json::Value) {
    let data = body.to_string();
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        data.len()
    );
    let _ = conn
        .write_all(head.as_bytes())
        .and_then(|_| conn.write_all(data.as_bytes()));
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = std::io::copy(&mut conn.take(2 << 20), &mut std::io::sink());
}

/// A client for an API socket: one request per connection.
#[derive(Clone, Debug)]
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

/// The largest response a client reads.
const MAX_RESPONSE: u64 = 16 << 20;

impl Client {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Client {
            path: path.into(),
            timeout: Duration::from_secs(120),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How long to wait for an answer.
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
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
        s.take(MAX_RESPONSE).read_to_end(&mut raw).map_err(ioe)?;
        let bad = |why: String| ApiError::BadResponse {
            path: self.path.clone(),
            why,
        };
        let (status, payload) = parse_response(&raw).map_err(bad)?;
        if status != 200 {
            let message = serde_json::from_slice::<ErrorBody>(&payload)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&payload).into_owned());
            return Err(ApiError::Refused {
                what: format!("{method} {path}"),
                status,
                message,
            });
        }
        serde_json::from_slice(&payload)
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
mod tests;
