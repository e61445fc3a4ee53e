//! Transport tests: counting, zero-copy and splice on plain sockets, mutual TLS, deadlines.
use std::io::{Read, Write};
use std::time::Duration;

use vm_memory::VolatileSlice;

use super::*;

#[test]
fn counts_both_directions() {
    let l = Listener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let t = std::thread::spawn(move || {
        let mut c = l.accept().unwrap();
        let mut b = [0u8; 5];
        c.reader.read_exact(&mut b).unwrap();
        c.writer.write_all(b"ok").unwrap();
        c.writer.flush().unwrap();
        (b, c.counters.received.load(Ordering::Relaxed))
    });
    let mut c = connect(&addr, Duration::from_secs(5), &Security::Insecure).unwrap();
    c.writer.write_all(b"hello").unwrap();
    c.writer.flush().unwrap();
    let mut r = [0u8; 2];
    c.reader.read_exact(&mut r).unwrap();
    let (got, recv) = t.join().unwrap();
    assert_eq!(&got, b"hello");
    assert_eq!(recv, 5);
    assert_eq!(c.counters.sent.load(Ordering::Relaxed), 5);
    assert_eq!(&r, b"ok");
}

#[test]
fn connect_from_binds_the_local_address() {
    let l = Listener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let c = connect_from(
        "127.0.0.2".parse().unwrap(),
        &addr,
        Duration::from_secs(5),
        &Security::Insecure,
    )
    .unwrap();
    let server = l.accept().unwrap();
    assert_eq!(server.peer.ip().to_string(), "127.0.0.2");
    drop(c);
}

/// The traffic class a socket's IPv6 headers carry.
fn tclass_v6(s: &TcpStream) -> u32 {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, which lives across the call.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_TCLASS,
            (&raw mut v).cast::<libc::c_void>(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    u32::try_from(v).unwrap()
}

#[test]
fn an_expedited_connection_marks_its_packets_as_signalling_and_still_carries_data() {
    for at in ["127.0.0.1:0", "[::1]:0"] {
        let Ok(l) = Listener::bind(at) else {
            println!("SKIPPED {at}: no such loopback here");
            continue;
        };
        let addr = l.local_addr().unwrap().to_string();
        let mut c = connect(&addr, Duration::from_secs(5), &Security::Insecure).unwrap();
        let mut server = l.accept().unwrap();
        c.shutdown_handle().unwrap().expedite().unwrap();
        let sock = socket2::SockRef::from(&c.socket);
        assert_eq!(sock.priority().unwrap(), INTERACTIVE_PRIORITY, "{at}");
        match c.socket.local_addr().unwrap() {
            SocketAddr::V4(_) => assert_eq!(sock.tos_v4().unwrap(), SIGNALLING_TOS),
            SocketAddr::V6(_) => assert_eq!(tclass_v6(&c.socket), SIGNALLING_TOS),
        }
        c.writer.write_all(b"paused").unwrap();
        c.writer.flush().unwrap();
        let mut b = [0u8; 6];
        server.reader.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"paused");
    }
}

#[test]
fn zero_copy_sends_arrive_intact_and_complete() {
    let l = Listener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let data: Vec<u8> = (0u32..(4 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    let expect = data.clone();
    let t = std::thread::spawn(move || {
        let mut c = l.accept().unwrap();
        let mut got = vec![0u8; 4 << 20];
        c.reader.read_exact(&mut got).unwrap();
        got
    });
    let mut c = connect(&addr, Duration::from_secs(5), &Security::Insecure).unwrap();
    let mut data = data;
    let parts: Vec<VolatileSlice<'_>> = data.chunks_mut(4096).map(VolatileSlice::from).collect();
    let (counters, limit) = c.writer.get_ref().accounting();
    let socket = c.split().socket.expect("a plain connection has its socket");
    let mut z = ZeroCopy::new(socket, counters, limit).unwrap();
    z.send_all(&parts).unwrap();
    z.finish(Duration::from_secs(5)).unwrap();
    assert!(t.join().unwrap() == expect);
    assert_eq!(c.counters.sent.load(Ordering::Relaxed), 4 << 20);
}

/// `len` bytes of a pattern sent over a plaintext loopback connection by a thread that then
/// closes it: the bytes, the accepted connection, the thread.
fn sent_over_loopback(len: u32) -> (Vec<u8>, Connection, std::thread::JoinHandle<()>) {
    let l = Listener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let data: Vec<u8> = (0..len).map(|i| (i * 13 % 251) as u8).collect();
    let sent = data.clone();
    let t = std::thread::spawn(move || {
        let mut c = connect(&addr, Duration::from_secs(5), &Security::Insecure).unwrap();
        c.writer.write_all(&sent).unwrap();
        c.writer.flush().unwrap();
    });
    (data, l.accept().unwrap(), t)
}

#[test]
fn socket_data_splices_into_a_file_at_its_offset_and_eof_is_truncation() {
    let (data, mut c, t) = sent_over_loopback((3 << 20) + 100);
    let dir = std::env::temp_dir().join(format!("lm-splice-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&dir)
        .unwrap();
    let _ = std::fs::remove_file(&dir);
    let src = c.reader.get_mut();
    // One long run, then scattered runs (each lands at its own offset, out of order too).
    src.read_to_file(&file, &[(8192, 2 << 20)]).unwrap();
    let pieces = [
        (16 << 20, 4096),
        (12 << 20, 100_000),
        ((8 << 20) + 5, (1 << 20) - 100_000 - 4096),
    ];
    src.read_to_file(&file, &pieces).unwrap();
    use std::os::unix::fs::FileExt;
    let mut got = vec![0u8; 2 << 20];
    file.read_exact_at(&mut got, 8192).unwrap();
    assert!(got == data[..2 << 20]);
    let mut at = 2 << 20;
    for (off, len) in pieces {
        let mut got = vec![0u8; len];
        file.read_exact_at(&mut got, off).unwrap();
        assert!(got == data[at..at + len], "run at {off:#x}");
        at += len;
    }
    assert_eq!(c.counters.received.load(Ordering::Relaxed), 3 << 20);
    t.join().unwrap();
    // 100 bytes left, then EOF: asking for more is an error, not a short success.
    let e = src
        .read_to_file(&file, &[(0, 50), (4096, 4096)])
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
}

#[test]
fn socket_data_reads_into_a_mapping_and_eof_is_truncation() {
    let (data, mut c, t) = sent_over_loopback((2 << 20) + 100);
    let mut buf = vec![0u8; 2 << 20];
    // SAFETY: `buf` outlives the slice and nothing else touches it meanwhile.
    let dst = unsafe { VolatileSlice::new(buf.as_mut_ptr(), buf.len()) };
    let src = c.reader.get_mut();
    src.read_to_slice(&dst).unwrap();
    assert!(buf == data[..2 << 20]);
    assert_eq!(c.counters.received.load(Ordering::Relaxed), 2 << 20);
    t.join().unwrap();
    let mut more = vec![0u8; 4096];
    // SAFETY: as above, for `more`.
    let dst = unsafe { VolatileSlice::new(more.as_mut_ptr(), more.len()) };
    let e = c.reader.get_mut().read_to_slice(&dst).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
}

#[test]
fn refused_connection_is_a_clear_error() {
    let l = Listener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    let e = connect(&addr, Duration::from_secs(2), &Security::Insecure)
        .err()
        .unwrap();
    assert!(e.to_string().contains(&addr), "{e}");
}

/// A cluster CA with hosts `a` and `b`, and a second, foreign CA with host `x`.
fn credentials() -> (
    tempfile::TempDir,
    tls::TlsFiles,
    tls::TlsFiles,
    tls::TlsFiles,
) {
    let d = tempfile::tempdir().unwrap();
    let cluster = d.path().join("cluster");
    let foreign = d.path().join("foreign");
    tls::init_cluster(&cluster, &["a".into(), "b".into()]).unwrap();
    tls::init_cluster(&foreign, &["x".into()]).unwrap();
    let files = |dir: &std::path::Path, h: &str| tls::TlsFiles {
        cert: dir.join(format!("{h}.pem")),
        key: dir.join(format!("{h}.key")),
        ca: cluster.join("ca.pem"),
    };
    let (a, b, x) = (
        files(&cluster, "a"),
        files(&cluster, "b"),
        files(&foreign, "x"),
    );
    (d, a, b, x)
}

fn tls(f: &tls::TlsFiles) -> Security {
    Security::Tls(Arc::new(tls::Tls::load(f).unwrap()))
}

/// Serves one connection with `security`; returns what the server read, or its error.
fn serve_one(security: Security) -> (String, std::thread::JoinHandle<Result<Vec<u8>, String>>) {
    let l = Listener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept_raw().map_err(|e| e.to_string())?;
        let mut c =
            Connection::accept(s, &security, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        let mut b = vec![0u8; 5];
        c.reader.read_exact(&mut b).map_err(|e| e.to_string())?;
        c.writer.write_all(b"ok").map_err(|e| e.to_string())?;
        c.writer.flush().map_err(|e| e.to_string())?;
        Ok(b)
    });
    (addr, t)
}

#[test]
fn members_of_one_cluster_talk_over_mutual_tls() {
    let (_d, a, b, _) = credentials();
    let (addr, t) = serve_one(tls(&b));
    let mut c = connect(&addr, Duration::from_secs(5), &tls(&a)).unwrap();
    assert!(
        c.is_tls() && c.split().socket.is_none(),
        "no zero-copy under TLS"
    );
    c.writer.write_all(b"hello").unwrap();
    c.writer.flush().unwrap();
    let mut r = [0u8; 2];
    c.reader.read_exact(&mut r).unwrap();
    assert_eq!(&r, b"ok");
    assert_eq!(t.join().unwrap().unwrap(), b"hello");
}

#[test]
fn a_side_that_closes_its_writes_still_reads_the_answer() {
    let (_d, a, b, _) = credentials();
    for (client, server) in [(tls(&a), tls(&b)), (Security::Insecure, Security::Insecure)] {
        let l = Listener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept_raw().unwrap();
            let mut c = Connection::accept(s, &server, Duration::from_secs(5)).unwrap();
            // Everything up to the peer's end, then an answer after it.
            let mut got = Vec::new();
            c.reader.read_to_end(&mut got).unwrap();
            c.writer
                .write_all(&(got.len() as u32).to_le_bytes())
                .unwrap();
            c.writer.flush().unwrap();
            got
        });
        let mut c = connect(&addr, Duration::from_secs(5), &client).unwrap();
        c.writer.write_all(&[7u8; 100_000]).unwrap();
        c.close_write().unwrap();
        let mut n = [0u8; 4];
        c.reader.read_exact(&mut n).unwrap();
        assert_eq!(u32::from_le_bytes(n), 100_000);
        assert_eq!(t.join().unwrap(), vec![7u8; 100_000]);
    }
}

#[test]
fn a_peer_without_a_cluster_certificate_is_refused_on_both_sides() {
    let (_d, a, b, x) = credentials();
    // A client with a foreign certificate: the server refuses it.
    let (addr, t) = serve_one(tls(&b));
    let client = connect(&addr, Duration::from_secs(5), &tls(&x));
    let server = t.join().unwrap().unwrap_err();
    assert!(server.contains("TLS"), "{server}");
    if let Ok(mut c) = client {
        // TLS 1.3: the client learns of it on its first read.
        let _ = c.writer.write_all(b"hello").and_then(|_| c.writer.flush());
        assert!(c.reader.read_exact(&mut [0u8; 2]).is_err());
    }
    // A plain client: refused too.
    let (addr, t) = serve_one(tls(&b));
    let mut c = connect(&addr, Duration::from_secs(5), &Security::Insecure).unwrap();
    let _ = c.writer.write_all(b"hello").and_then(|_| c.writer.flush());
    assert!(t.join().unwrap().is_err());
    // A server with a foreign certificate: the client refuses it.
    let (addr, t) = serve_one(tls(&x));
    let e = connect(&addr, Duration::from_secs(5), &tls(&a))
        .err()
        .expect("refused");
    assert!(matches!(e, TransportError::Handshake { .. }), "{e}");
    assert!(t.join().unwrap().is_err());
}

#[test]
fn a_silent_peer_times_out_with_a_clear_error() {
    let l = Listener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let c = connect(&addr, Duration::from_secs(5), &Security::Insecure).unwrap();
    let (_s, _) = l.accept_raw().unwrap();
    let mut c = c;
    c.set_peer_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let t = std::time::Instant::now();
    let e = c.reader.read(&mut [0u8; 4]).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    assert!(
        e.to_string()
            .contains("timed out after 0.3 s waiting for 127.0.0.1"),
        "{e}"
    );
}

#[test]
fn a_tls_handshake_that_never_comes_times_out() {
    let (_d, _a, b, _) = credentials();
    let l = Listener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let _silent = std::net::TcpStream::connect(&addr).unwrap();
    let (s, _) = l.accept_raw().unwrap();
    let t = std::time::Instant::now();
    let e = Connection::accept(s, &tls(&b), Duration::from_millis(300))
        .err()
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{e}");
    assert!(e.to_string().contains("sent nothing within 0.3 s"), "{e}");
}

/// Each side of a TLS/plaintext mismatch says which it is, on both ends, instead of "unexpected
/// end of file".
#[test]
fn a_protection_mismatch_is_named_on_both_sides() {
    let (_d, a, b, _) = credentials();
    // A TLS source, a plaintext listener.
    let (addr, t) = serve_one(Security::Insecure);
    let e = connect(&addr, Duration::from_secs(5), &tls(&a))
        .err()
        .expect("refused");
    assert!(matches!(e, TransportError::NoTlsThere { .. }), "{e}");
    assert!(e.to_string().contains("does not speak TLS"), "{e}");
    let server = t.join().unwrap().unwrap_err();
    assert!(
        server.contains("started TLS with a listener that runs --insecure"),
        "{server}"
    );
    // A plaintext source, a TLS listener: the notice is what it reads back.
    let (addr, t) = serve_one(tls(&b));
    let mut c = connect(&addr, Duration::from_secs(5), &Security::Insecure).unwrap();
    c.writer
        .write_all(b"LVMG\x03\0\0\0\0\0\0\0\0\0\0\0")
        .unwrap();
    c.writer.flush().unwrap();
    let mut answer = [0u8; mismatch::LEN];
    c.reader.read_exact(&mut answer).unwrap();
    assert_eq!(mismatch::status(&answer), Some(mismatch::TLS_REQUIRED));
    let server = t.join().unwrap().unwrap_err();
    assert!(server.contains("spoke plaintext"), "{server}");
    // A listener that closes at once: the TLS source says so.
    let l = Listener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let t = std::thread::spawn(move || drop(l.accept_raw().unwrap()));
    let e = connect(&addr, Duration::from_secs(5), &tls(&a))
        .err()
        .expect("refused");
    t.join().unwrap();
    assert!(
        matches!(
            e,
            TransportError::HandshakeClosed { .. } | TransportError::Handshake { .. }
        ),
        "{e}"
    );
}

#[test]
fn init_reuses_the_ca_and_writes_private_keys_0600() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    tls::init_cluster(d.path(), &["a".into()]).unwrap();
    let ca = std::fs::read(d.path().join("ca.pem")).unwrap();
    tls::init_cluster(d.path(), &["b".into()]).unwrap();
    assert_eq!(
        std::fs::read(d.path().join("ca.pem")).unwrap(),
        ca,
        "CA kept"
    );
    for k in ["ca.key", "a.key", "b.key"] {
        let mode = std::fs::metadata(d.path().join(k))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{k}");
    }
    assert!(tls::init_cluster(d.path(), &["../evil".into()]).is_err());
    // b, added later, still talks to a.
    let files = |h: &str| tls::TlsFiles {
        cert: d.path().join(format!("{h}.pem")),
        key: d.path().join(format!("{h}.key")),
        ca: d.path().join("ca.pem"),
    };
    let (addr, t) = serve_one(tls(&files("a")));
    let mut c = connect(&addr, Duration::from_secs(5), &tls(&files("b"))).unwrap();
    c.writer.write_all(b"hello").unwrap();
    c.writer.flush().unwrap();
    assert_eq!(t.join().unwrap().unwrap(), b"hello");
}
