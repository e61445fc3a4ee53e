//! The server's guarantees: private socket, bounded clients, clear 4xx.
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::*;

fn echo() -> Handler {
    Arc::new(|r: &Request| match (r.method.as_str(), r.path.as_str()) {
        ("POST", "/echo") => serde_json::from_slice(&r.body).map_err(|e| (400, e.to_string())),
        ("GET", "/slow") => {
            std::thread::sleep(Duration::from_millis(800));
            Ok(serde_json::json!("done"))
        }
        _ => Err((404, format!("no {} {}", r.method, r.path))),
    })
}

fn limits() -> Limits {
    Limits {
        connections: 2,
        read_timeout: Duration::from_millis(300),
        max_body: 1024,
    }
}

fn raw(path: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn the_socket_is_private_and_replaces_only_a_stale_socket() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("api.sock");
    let s = Server::start(&p, echo(), limits()).unwrap();
    let mode = std::fs::metadata(&p).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let e = Server::start(&p, echo(), limits()).err().unwrap();
    assert!(e.to_string().contains("another process serves it"), "{e}");
    drop(s);
    // A stale socket (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&p).unwrap());
    let s = Server::start(&p, echo(), limits()).unwrap();
    drop(s);
    // A file that is not a socket is never replaced.
    std::fs::write(&p, "precious").unwrap();
    let e = Server::start(&p, echo(), limits()).err().unwrap();
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read_to_string(&p).unwrap(), "precious");
}

#[test]
fn requests_are_answered_and_bad_ones_get_a_4xx() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("api.sock");
    let _s = Server::start(&p, echo(), limits()).unwrap();
    let c = Client::new(&p);
    let v: serde_json::Value = c
        .call("POST", "/echo", Some(serde_json::json!({"a": 1})))
        .unwrap();
    assert_eq!(v["a"], 1);
    let e = c
        .call::<serde_json::Value>("GET", "/nope", None)
        .unwrap_err();
    assert_eq!(e.status(), Some(404));
    let big = "x".repeat(2000);
    let e = c
        .call::<serde_json::Value>("POST", "/echo", Some(serde_json::json!(big)))
        .unwrap_err();
    assert_eq!(e.status(), Some(413), "{e}");
    assert!(raw(&p, b"GARBAGE\r\n\r\n").starts_with("HTTP/1.1 400"));
    assert!(
        raw(&p, b"POST /echo HTTP/1.1\r\nContent-Length: zz\r\n\r\n").starts_with("HTTP/1.1 400")
    );
    assert!(raw(
        &p,
        b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .starts_with("HTTP/1.1 411"));
}

#[test]
fn a_slow_client_times_out_and_too_many_get_503() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("api.sock");
    let _s = Server::start(&p, echo(), limits()).unwrap();
    // Half a head, then silence: 408 within the read timeout.
    let t = Instant::now();
    let mut slow = UnixStream::connect(&p).unwrap();
    slow.write_all(b"GET /sl").unwrap();
    let mut out = String::new();
    let _ = slow.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(2));
    drop(slow);
    std::thread::sleep(Duration::from_millis(300));
    // Two slow requests hold both slots; a third gets 503 at once.
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let p = p.clone();
            std::thread::spawn(move || {
                Client::new(p).call::<serde_json::Value>("GET", "/slow", None)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let e = Client::new(&p)
        .call::<serde_json::Value>("GET", "/slow", None)
        .unwrap_err();
    assert_eq!(e.status(), Some(503), "{e}");
    for b in busy {
        assert!(b.join().unwrap().is_ok());
    }
}

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
