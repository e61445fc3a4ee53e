//! Streams between migration peers. Mechanism only: which stream and how many is policy that
//! lives in the migration engine. Every stream counts the bytes it moves, so the engine can
//! measure bandwidth and report bytes on the wire.
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const BUF: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("resolving {addr}: {source}")]
    Resolve { addr: String, source: io::Error },
    #[error("connecting to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("listening on {addr}: {source}")]
    Listen { addr: String, source: io::Error },
    #[error("accepting a connection on {addr}: {source}")]
    Accept { addr: String, source: io::Error },
    #[error("configuring the socket to {peer}: {source}")]
    Configure { peer: String, source: io::Error },
}

/// Bytes moved by one connection, readable while it runs.
#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

pub struct CountingReader<R> {
    inner: R,
    counters: Arc<Counters>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counters
            .received
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

pub struct CountingWriter<W> {
    inner: W,
    counters: Arc<Counters>,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.counters.sent.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let n = self.inner.write_vectored(bufs)?;
        self.counters.sent.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// One TCP connection, split into a buffered reader and writer.
pub struct Connection {
    pub reader: BufReader<CountingReader<TcpStream>>,
    pub writer: BufWriter<CountingWriter<TcpStream>>,
    pub counters: Arc<Counters>,
    pub peer: SocketAddr,
    stream: TcpStream,
}

impl Connection {
    fn new(stream: TcpStream) -> Result<Self, TransportError> {
        let peer = stream
            .peer_addr()
            .map_err(|source| TransportError::Configure {
                peer: "?".into(),
                source,
            })?;
        let cfg = |source| TransportError::Configure {
            peer: peer.to_string(),
            source,
        };
        stream.set_nodelay(true).map_err(cfg)?;
        let counters = Arc::new(Counters::default());
        let reader = BufReader::with_capacity(
            BUF,
            CountingReader {
                inner: stream.try_clone().map_err(cfg)?,
                counters: counters.clone(),
            },
        );
        let writer = BufWriter::with_capacity(
            BUF,
            CountingWriter {
                inner: stream.try_clone().map_err(cfg)?,
                counters: counters.clone(),
            },
        );
        Ok(Connection {
            reader,
            writer,
            counters,
            peer,
            stream,
        })
    }

    /// A read that waits longer than this fails: how a dead peer is noticed.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(t)
    }

    /// Closes both directions at once (the peer sees EOF; our pending reads fail).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

pub fn connect(addr: &str, timeout: Duration) -> Result<Connection, TransportError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|source| TransportError::Resolve {
            addr: addr.into(),
            source,
        })?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Connection::new(s),
            Err(e) => last = e,
        }
    }
    Err(TransportError::Connect {
        addr: addr.into(),
        source: last,
    })
}

pub struct Listener {
    inner: TcpListener,
    addr: String,
}

impl Listener {
    pub fn bind(addr: &str) -> Result<Self, TransportError> {
        let inner = TcpListener::bind(addr).map_err(|source| TransportError::Listen {
            addr: addr.into(),
            source,
        })?;
        Ok(Listener {
            inner,
            addr: addr.into(),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    pub fn accept(&self) -> Result<Connection, TransportError> {
        let (s, _) = self
            .inner
            .accept()
            .map_err(|source| TransportError::Accept {
                addr: self.addr.clone(),
                source,
            })?;
        Connection::new(s)
    }
}

#[cfg(test)]
mod tests {
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
        let mut c = connect(&addr, Duration::from_secs(5)).unwrap();
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
    fn refused_connection_is_a_clear_error() {
        let l = Listener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let e = connect(&addr, Duration::from_secs(2)).err().unwrap();
        assert!(e.to_string().contains(&addr), "{e}");
    }
}
