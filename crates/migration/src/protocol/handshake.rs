//! The first 16 bytes each way: a migration's hello and its answer, a page stream's and a
//! link probe's openings, and the answers a listener gives when it cannot take a connection.
use std::io::{Read, Write};

use zerocopy::byteorder::little_endian::{U16, U64};
use zerocopy::{FromBytes, IntoBytes};

use super::*;

/// What the source offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub transport: Transport,
    pub capabilities: u64,
}

/// The destination's answer to a hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum HelloStatus {
    Ok = 0,
    Version = 1,
    Transport = 2,
    // 3 and 4: a listener's notice to a peer of the other protection ([`transport::mismatch`]).
    /// The listener has no room for another connection now; the reason follows as a Busy
    /// frame's payload would, as a u16 length and UTF-8.
    Busy = 5,
}

pub fn write_hello(w: &mut impl Write, h: &Hello) -> Result<(), ProtocolError> {
    let wire = HelloWire {
        magic: MAGIC,
        version: U16::new(h.version),
        transport: h.transport as u8,
        status: 0,
        capabilities: U64::new(h.capabilities),
    };
    w.write_all(wire.as_bytes())?;
    Ok(w.flush()?)
}

/// What a new connection says it is, from its first 16 bytes.
#[derive(Clone, Copy, Debug)]
pub enum Opening {
    /// A source opening a migration; answer with [`answer_hello`].
    Control(HelloWire),
    /// A page stream of migration `session`.
    Stream { index: u16, session: u64 },
    /// A link probe: bytes to discard, counted by the sender (host agents measure links).
    Probe,
}

/// Reads a connection's first 16 bytes: a migration's hello or a page stream's.
pub fn read_opening(r: &mut impl Read) -> Result<Opening, ProtocolError> {
    let h: HelloWire = read_header(r, "the handshake")?;
    if h.magic == MAGIC {
        return Ok(Opening::Control(h));
    }
    if h.magic == PROBE_MAGIC {
        return Ok(Opening::Probe);
    }
    if h.magic != DATA_MAGIC {
        return Err(ProtocolError::BadMagic(h.magic));
    }
    // The same 16 bytes, read as a page stream's hello.
    let d = DataHelloWire::read_from_bytes(h.as_bytes())
        .map_err(|_| ProtocolError::Truncated("a page stream's handshake"))?;
    if d.version.get() != VERSION {
        return Err(ProtocolError::Version {
            theirs: d.version.get(),
        });
    }
    Ok(Opening::Stream {
        index: d.index.get(),
        session: d.session.get(),
    })
}

/// Answers a source's hello; on a version or transport we do not speak, tells the peer why.
pub fn answer_hello(w: &mut impl Write, h: &HelloWire) -> Result<Hello, ProtocolError> {
    let transport = Transport::from_u8(h.transport);
    let status = match (h.version.get() == VERSION, transport) {
        (false, _) => HelloStatus::Version,
        (true, None) => HelloStatus::Transport,
        (true, Some(_)) => HelloStatus::Ok,
    };
    let reply = HelloWire {
        magic: MAGIC,
        version: U16::new(VERSION),
        transport: h.transport,
        status: status as u8,
        capabilities: U64::new(0),
    };
    w.write_all(reply.as_bytes())?;
    w.flush()?;
    match (status, transport) {
        (HelloStatus::Ok, Some(t)) => Ok(Hello {
            version: h.version.get(),
            transport: t,
            capabilities: h.capabilities.get(),
        }),
        (HelloStatus::Version, _) => Err(ProtocolError::Version {
            theirs: h.version.get(),
        }),
        _ => Err(ProtocolError::TransportUnsupported(h.transport)),
    }
}

/// Reads the source's hello and answers it (a connection known to be a control connection).
pub fn accept_hello(r: &mut impl Read, w: &mut impl Write) -> Result<Hello, ProtocolError> {
    match read_opening(r)? {
        Opening::Control(h) => answer_hello(w, &h),
        Opening::Stream { .. } => Err(ProtocolError::BadMagic(DATA_MAGIC)),
        Opening::Probe => Err(ProtocolError::BadMagic(PROBE_MAGIC)),
    }
}

/// First bytes of a link probe; the rest is filler the receiver discards.
pub fn write_probe_hello(w: &mut impl Write) -> Result<(), ProtocolError> {
    let wire = HelloWire {
        magic: PROBE_MAGIC,
        version: U16::new(VERSION),
        transport: 0,
        status: 0,
        capabilities: U64::new(0),
    };
    w.write_all(wire.as_bytes())?;
    Ok(w.flush()?)
}

/// What a link probe's receiver says of it: the bytes it read, over how long, and how its
/// thread spent that time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeReport {
    pub bytes: u64,
    pub wall: std::time::Duration,
    pub times: sched::ThreadTimes,
}

impl ProbeReport {
    /// The share of the probe the receiving thread was on a core or waiting for one.
    pub fn runnable_share(&self) -> f64 {
        self.times.runnable_share(self.wall)
    }
}

/// The receiver's last word on a probe, after the prober closed its side.
pub fn write_probe_report(w: &mut impl Write, r: &ProbeReport) -> Result<(), ProtocolError> {
    let ns = |d: std::time::Duration| U64::new(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let wire = ProbeReportWire {
        magic: PROBE_REPORT_MAGIC,
        reserved: [0; 4],
        bytes: U64::new(r.bytes),
        wall_ns: ns(r.wall),
        on_cpu_ns: ns(r.times.on_cpu),
        waiting_ns: ns(r.times.waiting),
    };
    w.write_all(wire.as_bytes())?;
    Ok(w.flush()?)
}

/// Reads a probe receiver's report (times beyond its wall time are cut to it).
pub fn read_probe_report(r: &mut impl Read) -> Result<ProbeReport, ProtocolError> {
    let h: ProbeReportWire = read_header(r, "a probe's report")?;
    if h.magic != PROBE_REPORT_MAGIC {
        return Err(ProtocolError::BadMagic(h.magic));
    }
    let wall = std::time::Duration::from_nanos(h.wall_ns.get());
    let cut = |ns: U64| std::time::Duration::from_nanos(ns.get()).min(wall);
    Ok(ProbeReport {
        bytes: h.bytes.get(),
        wall,
        times: sched::ThreadTimes {
            on_cpu: cut(h.on_cpu_ns),
            waiting: cut(h.waiting_ns),
        },
    })
}

/// Reads the destination's answer to our hello.
pub fn read_hello_reply(r: &mut impl Read, ours: &Hello) -> Result<(), ProtocolError> {
    let h: HelloWire = read_header(r, "the handshake reply")?;
    if transport::mismatch::status(h.as_bytes()) == Some(transport::mismatch::TLS_REQUIRED) {
        return Err(ProtocolError::TlsRequired);
    }
    if h.magic != MAGIC {
        return Err(ProtocolError::BadMagic(h.magic));
    }
    match h.status {
        s if s == HelloStatus::Ok as u8 => Ok(()),
        s if s == HelloStatus::Version as u8 => Err(ProtocolError::Version {
            theirs: h.version.get(),
        }),
        s if s == HelloStatus::Busy as u8 => Err(ProtocolError::PeerBusy(read_reason(r)?)),
        _ => Err(ProtocolError::TransportUnsupported(ours.transport as u8)),
    }
}

/// Answers a hello with Busy and why: the listener has no room for this connection now.
pub fn answer_busy(w: &mut impl Write, why: &str) -> Result<(), ProtocolError> {
    let reply = HelloWire {
        magic: MAGIC,
        version: U16::new(VERSION),
        transport: 0,
        status: HelloStatus::Busy as u8,
        capabilities: U64::new(0),
    };
    let why = &why.as_bytes()[..why.len().min(MAX_REASON)];
    w.write_all(reply.as_bytes())?;
    w.write_all(U16::new(u16::try_from(why.len()).unwrap_or(u16::MAX)).as_bytes())?;
    w.write_all(why)?;
    Ok(w.flush()?)
}

/// The longest reason a Busy hello answer carries.
pub(super) const MAX_REASON: usize = 1024;

/// A Busy hello answer's reason: a u16 length (at most [`MAX_REASON`]) and UTF-8.
pub(super) fn read_reason(r: &mut impl Read) -> Result<String, ProtocolError> {
    let len: U16 = read_header(r, "a busy answer's reason")?;
    let len = usize::from(len.get());
    if len > MAX_REASON {
        return Err(ProtocolError::Malformed {
            kind: Kind::Busy,
            why: format!("a reason of {len} bytes, the limit is {MAX_REASON}"),
        });
    }
    let mut why = vec![0u8; len];
    read_full(r, &mut why, "a busy answer's reason")?;
    Ok(String::from_utf8_lossy(&why).into_owned())
}

/// First bytes on a page stream: magic `LVMD`, version, stream index, session.
pub fn write_data_hello(w: &mut impl Write, index: u16, session: u64) -> Result<(), ProtocolError> {
    let wire = DataHelloWire {
        magic: DATA_MAGIC,
        version: U16::new(VERSION),
        index: U16::new(index),
        session: U64::new(session),
    };
    w.write_all(wire.as_bytes())?;
    Ok(w.flush()?)
}

/// Reads a page stream's hello and checks it belongs to `session` with `streams` streams;
/// returns its index.
pub fn read_data_hello(
    r: &mut impl Read,
    session: u64,
    streams: u16,
) -> Result<u16, ProtocolError> {
    match read_opening(r)? {
        Opening::Stream { index, session: s } => check_stream(index, s, session, streams),
        Opening::Control(h) => Err(ProtocolError::BadMagic(h.magic)),
        Opening::Probe => Err(ProtocolError::BadMagic(PROBE_MAGIC)),
    }
}

/// A page stream `index` of session `theirs` must be one of `streams` of `session`.
pub fn check_stream(
    index: u16,
    theirs: u64,
    session: u64,
    streams: u16,
) -> Result<u16, ProtocolError> {
    if theirs != session || index >= streams {
        return Err(malformed(Kind::Config)(format!(
            "page stream {index} of session {theirs:#x} does not belong to session {session:#x} with {streams} streams"
        )));
    }
    Ok(index)
}
