//! Accepting migrations on one listening address, safely: every connection gets its own thread
//! and a slot from the [`Gate`], which bounds how many connections wait to authenticate (in
//! all, and per source address), keeps authenticated ones apart, and closes any that has not
//! finished TLS and said what it is by its deadline; a control connection becomes a
//! migration, a page stream joins its migration by session; a bad connection (garbage, HTTP,
//! a wrong version, a byte a second, no certificate) affects only itself, and a flood of them
//! cannot keep a cluster member out.
use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use transport::{Connection, Listener, Security, ShutdownHandle};

use super::gate::{Gate, GateError, Ticket};
use crate::protocol::{self, FrameReader, FrameWriter, Hello, Opening, Prepare, MAX_STREAMS};
use crate::MigrationError;
use ram::GuestRam;

/// A migration's control connection, its handshake done.
pub struct Pending {
    pub conn: Connection,
    pub hello: Hello,
    pub peer: SocketAddr,
    /// Its place among the listener's authenticated connections, held as long as this is.
    slot: Ticket,
}

impl Pending {
    /// Turns the migration away with a reason the source will show.
    pub fn refuse(mut self, why: &str) {
        let _ = FrameWriter::new(&mut self.conn.writer).send_abort(why);
        self.conn.shutdown();
    }

    /// Turns the migration away for now: this host cannot take it at the moment (the source
    /// says the destination is busy, and a drain tries again later).
    pub fn busy(mut self, why: &str) {
        let _ = FrameWriter::new(&mut self.conn.writer).send_busy(why);
        self.conn.shutdown();
    }

    /// The connection, the hello and the peer; the slot is given back.
    pub(super) fn into_parts(self) -> (Connection, Hello, SocketAddr) {
        let Pending {
            conn, hello, peer, ..
        } = self;
        (conn, hello, peer)
    }

    /// The VM the source offers (its Config), read within `within`: what a host agent decides
    /// on before anything is built.
    pub fn offer(&mut self, within: Duration) -> Result<Prepare, MigrationError> {
        let handle = self
            .conn
            .shutdown_handle()
            .map_err(MigrationError::socket("cloning a socket"))?;
        let watchdog = Watchdog::arm(handle, within);
        let mut reader = FrameReader::new(&mut self.conn.reader);
        let offer = match reader.next_frame() {
            Ok(protocol::Frame::Config(p)) => Ok(p),
            Ok(f) => Err(protocol::ProtocolError::Unexpected {
                kind: f.kind(),
                state: "awaiting-config",
            }
            .into()),
            Err(e) => Err(MigrationError::from(e)),
        };
        if watchdog.disarm() && offer.is_err() {
            return Err(MigrationError::TimedOut {
                secs: within.as_secs_f64(),
                waiting_for: "the source's Config".into(),
            });
        }
        offer
    }

    /// Sends the source to the receiver that waits for it on `port` of this host (see
    /// [`Incoming::redirect`]).
    fn redirect(mut self, port: u16) -> Result<(), MigrationError> {
        let mut out = FrameWriter::new(&mut self.conn.writer);
        out.send_redirect(&protocol::Redirect { port })?;
        out.flush()?;
        self.conn.shutdown();
        Ok(())
    }
}

/// Shuts a connection down unless disarmed by a deadline: a peer that sends a byte a second
/// cannot hold a slot, whatever it is doing.
pub(super) struct Watchdog {
    state: Arc<(Mutex<(bool, bool)>, Condvar)>,
}

impl Watchdog {
    pub fn arm(handle: ShutdownHandle, within: Duration) -> Self {
        let state = Arc::new((Mutex::new((false, false)), Condvar::new()));
        let s = state.clone();
        let spawned = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                let deadline = Instant::now() + within;
                let mut g = locks::lock(&s.0);
                while !g.0 {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        g.1 = true;
                        handle.shutdown();
                        return;
                    }
                    g = locks::wait_timeout(&s.1, g, left);
                }
            });
        if spawned.is_err() {
            // No thread, no deadline: refuse the connection rather than serve it unguarded.
            locks::lock(&state.0).1 = true;
        }
        Watchdog { state }
    }

    /// Stops the clock; true if it had already fired (the connection is closed).
    pub fn disarm(self) -> bool {
        let mut g = locks::lock(&self.state.0);
        g.0 = true;
        self.state.1.notify_all();
        g.1
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        locks::lock(&self.state.0).0 = true;
        self.state.1.notify_all();
    }
}

/// Page streams arriving for one migration, until it is dropped.
pub(super) struct StreamSlot<'a> {
    incoming: &'a Incoming,
    session: u64,
    pub arrivals: Receiver<(u16, Connection)>,
}

impl Drop for StreamSlot<'_> {
    fn drop(&mut self) {
        locks::lock(&self.incoming.sessions).remove(&self.session);
    }
}

/// Page streams that arrived before their migration read its Config (the source connects them
/// right after sending it): kept a short while, bounded, for the migration to pick up.
#[derive(Default)]
struct Parked {
    streams: Vec<(u64, u16, Connection, Instant)>,
    /// Sessions sent elsewhere: their page streams here are dropped quietly.
    redirected: std::collections::VecDeque<u64>,
}

/// Remember this many redirected sessions.
const MAX_REDIRECTED: usize = 64;

/// At most this many early page streams wait for their migration at once.
const MAX_PARKED: usize = 4 * MAX_STREAMS as usize;

/// At most this many link probes run at once, each for at most [`MAX_PROBE_TIME`] (the
/// streams of one probing agent: two paths, two streams on each).
const MAX_PROBES: usize = 4;
const MAX_PROBE_TIME: Duration = Duration::from_secs(30);
/// Memory a probe lands its bytes in, freed and refilled in turn.
const PROBE_LANDING: u64 = 64 << 20;

/// Writes a probe's bytes into a memfd until the prober closes its side or
/// [`MAX_PROBE_TIME`]; every [`PROBE_LANDING`] bytes the pages are freed, so each write
/// allocates, as guest RAM does. At the prober's close, says how this thread spent the probe:
/// whether the cores or the link held it back is for the prober to tell.
fn land_probe(conn: &mut Connection) -> Result<(), MigrationError> {
    let ram = GuestRam::new(PROBE_LANDING)?;
    let (start, times) = (Instant::now(), sched::ThreadTimes::current());
    let mut buf = vec![0u8; 256 << 10];
    let (mut off, mut bytes) = (0, 0);
    while start.elapsed() < MAX_PROBE_TIME {
        let n = match std::io::Read::read(&mut conn.reader, &mut buf) {
            Ok(0) => break,
            Err(_) => return Ok(()),
            Ok(n) => n,
        };
        if off + n as u64 > PROBE_LANDING {
            ram.zero_range(0, PROBE_LANDING)?;
            off = 0;
        }
        ram.write_at(off, &buf[..n])?;
        off += n as u64;
        bytes += n as u64;
    }
    let Some(spent) = times.zip(sched::ThreadTimes::current()) else {
        return Ok(());
    };
    let report = crate::protocol::ProbeReport {
        bytes,
        wall: start.elapsed(),
        times: spent.1.since(&spent.0),
    };
    Ok(crate::protocol::write_probe_report(
        &mut conn.writer,
        &report,
    )?)
}

pub struct Incoming {
    listener: Listener,
    pub(super) security: Security,
    pub(super) opts: super::ReceiveOptions,
    sessions: Mutex<HashMap<u64, SyncSender<(u16, Connection)>>>,
    parked: Mutex<Parked>,
    gate: Arc<Gate>,
    probes: AtomicUsize,
    /// The expected session started here (see `ReceiveOptions::expect_session`).
    claimed: AtomicBool,
    stopped: AtomicBool,
}

/// What runs a migration once its control connection said hello (on that connection's thread).
pub type OnMigration = Arc<dyn Fn(Pending) + Send + Sync>;

impl Incoming {
    pub fn new(listener: Listener, security: Security, opts: super::ReceiveOptions) -> Arc<Self> {
        Arc::new(Incoming {
            gate: Gate::new(opts.limits),
            listener,
            security,
            opts,
            sessions: Mutex::new(HashMap::new()),
            parked: Mutex::new(Parked::default()),
            probes: AtomicUsize::new(0),
            claimed: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until [`Self::stop`]; each is handled on its own thread, from a
    /// slot of the gate (whose sweeper closes those past their deadline meanwhile).
    pub fn serve(self: &Arc<Self>, on_migration: OnMigration) {
        let gate = self.gate.clone();
        let sweeper = std::thread::Builder::new()
            .name("gate".into())
            .spawn(move || gate.sweep());
        if let Err(e) = sweeper {
            // No sweeper, no deadlines: serve nobody rather than serve unguarded.
            tracing::error!("starting the listener's sweeper: {e}");
            return;
        }
        let t = self.opts.handshake_timeout;
        while !self.stopped.load(Ordering::SeqCst) {
            let (stream, peer) = match self.listener.accept_raw() {
                Ok(a) => a,
                Err(e) => {
                    if !self.stopped.load(Ordering::SeqCst) {
                        tracing::warn!("{e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    continue;
                }
            };
            let ticket = match self.gate.enter(&stream, peer.ip(), t) {
                Ok(ticket) => ticket,
                Err(e) => {
                    tracing::warn!("refused a connection from {peer}: {e}");
                    continue;
                }
            };
            let (me, cb) = (self.clone(), on_migration.clone());
            let spawned = std::thread::Builder::new()
                .name("incoming".into())
                .spawn(move || me.opening(stream, peer, ticket, &cb));
            if let Err(e) = spawned {
                tracing::warn!("refused a connection from {peer}: no thread for it: {e}");
            }
        }
        self.gate.stop();
    }

    /// Connections held now that have not authenticated, and that have.
    pub fn held(&self) -> (usize, usize) {
        self.gate.held()
    }

    pub(super) fn claim(&self) {
        self.claimed.store(true, Ordering::SeqCst);
    }

    /// Whether the one session this receiver waits for has started.
    pub(super) fn claimed(&self) -> bool {
        self.claimed.load(Ordering::SeqCst)
    }

    /// Stops accepting; migrations under way go on.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.listener.shutdown();
        self.gate.stop();
    }

    /// A new connection: TLS and the first 16 bytes within the handshake deadline (the gate
    /// closes it past that), then a migration (control) or a place in one (page stream).
    fn opening(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        ticket: Ticket,
        on_migration: &OnMigration,
    ) {
        match self.identify(stream, ticket) {
            Ok(Arrival::Control(p)) => {
                // Its own deadlines apply from here (the offer's, the migration's).
                p.slot.set_deadline(None);
                on_migration(p)
            }
            Ok(Arrival::Stream {
                index,
                session,
                conn,
            }) => self.join(index, session, conn),
            Ok(Arrival::Probe(conn)) => self.discard(conn),
            Err((e, closed)) if closed => {
                tracing::debug!("closed a connection from {peer} by the gate: {e}")
            }
            Err((e, _)) => tracing::warn!("refused a connection from {peer}: {e}"),
        }
    }

    /// A link probe: lands what the prober sends in fresh memory, as a migration lands pages,
    /// then frees it; bounded in number, time and memory ([`PROBE_LANDING`] each). The prober
    /// counts what TCP acknowledged, so it measures what this host can take in, not only the
    /// wire.
    fn discard(&self, mut conn: Connection) {
        if self.probes.fetch_add(1, Ordering::SeqCst) >= MAX_PROBES {
            self.probes.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(
                "refused a link probe from {}: {MAX_PROBES} under way",
                conn.peer
            );
            return;
        }
        if let Err(e) = land_probe(&mut conn) {
            tracing::debug!("link probe from {} ended: {e}", conn.peer);
        }
        conn.shutdown();
        self.probes.fetch_sub(1, Ordering::SeqCst);
    }

    /// TLS and the opening 16 bytes; the slot moves to the authenticated pool once the peer
    /// proved who it is (its certificate; its hello, on a plaintext listener). On failure, the
    /// error and whether the gate had closed the connection (its deadline, or to make room).
    fn identify(
        &self,
        stream: TcpStream,
        ticket: Ticket,
    ) -> Result<Arrival, (MigrationError, bool)> {
        let t = self.opts.handshake_timeout;
        let closed = |e: MigrationError, ticket: &Ticket| (e, ticket.was_closed());
        let mut conn = match Connection::accept(stream, &self.security, t) {
            Ok(c) => c,
            Err(e) => return Err(closed(e.into(), &ticket)),
        };
        if let Err(e) = conn.set_peer_timeout(Some(t)) {
            let e = MigrationError::socket("setting the peer timeout")(e);
            return Err((e, false));
        }
        let tls = conn.is_tls();
        let mut ticket = Some(ticket);
        if tls {
            ticket = Some(self.authenticated(ticket.take(), &mut conn, None)?);
        }
        let opening = match protocol::read_opening(&mut conn.reader) {
            Ok(o) => o,
            Err(e) => {
                let was_closed = ticket.as_ref().is_some_and(Ticket::was_closed);
                return Err((e.into(), was_closed));
            }
        };
        let slot = match ticket {
            Some(t) => t,
            None => return Err((MigrationError::StreamFailed, false)),
        };
        let slot = if tls {
            slot
        } else {
            self.authenticated(Some(slot), &mut conn, Some(&opening))?
        };
        Ok(match opening {
            Opening::Control(h) => {
                let hello =
                    protocol::answer_hello(&mut conn.writer, &h).map_err(|e| (e.into(), false))?;
                let peer = conn.peer;
                Arrival::Control(Pending {
                    conn,
                    hello,
                    peer,
                    slot,
                })
            }
            Opening::Stream { index, session } => Arrival::Stream {
                index,
                session,
                conn,
            },
            Opening::Probe => Arrival::Probe(conn),
        })
    }

    /// Moves a connection's slot to the authenticated pool (with the rest of the handshake
    /// deadline); when that pool is full, a control connection is told the host is busy.
    fn authenticated(
        &self,
        ticket: Option<Ticket>,
        conn: &mut Connection,
        opening: Option<&Opening>,
    ) -> Result<Ticket, (MigrationError, bool)> {
        let Some(ticket) = ticket else {
            return Err((MigrationError::StreamFailed, false));
        };
        let was_closed = ticket.was_closed();
        match ticket.authenticated(Some(self.opts.handshake_timeout)) {
            Ok(t) => Ok(t),
            Err(GateError::Full(n)) => {
                let why = format!("{n} authenticated connections are opening at once");
                // A control connection's hello is answered with Busy (read it first if it
                // has not been, so the source finds the answer where it looks).
                let control = match opening {
                    Some(o) => Some(matches!(o, Opening::Control(_))),
                    None => protocol::read_opening(&mut conn.reader)
                        .ok()
                        .map(|o| matches!(o, Opening::Control(_))),
                };
                if control == Some(true) {
                    let _ = protocol::answer_busy(&mut conn.writer, &why);
                }
                conn.shutdown();
                Err((MigrationError::Refused(format!("busy: {why}")), false))
            }
            Err(e) => Err((
                MigrationError::Socket {
                    what: "taking a connection slot",
                    source: std::io::Error::other(e.to_string()),
                },
                was_closed,
            )),
        }
    }

    /// Hands a page stream to the migration whose session it names. One that comes before its
    /// migration registered waits (a handshake timeout at most, a bounded number of them); a
    /// stream for no migration is dropped then, and only it.
    fn join(&self, index: u16, session: u64, conn: Connection) {
        let sessions = locks::lock(&self.sessions);
        if let Some(tx) = sessions.get(&session) {
            if let Err(e) = tx.try_send((index, conn)) {
                let peer = match e {
                    std::sync::mpsc::TrySendError::Full((_, c))
                    | std::sync::mpsc::TrySendError::Disconnected((_, c)) => c.peer,
                };
                tracing::warn!(
                    "refused page stream {index} from {peer}: its migration has all it takes"
                );
            }
            return;
        }
        let mut parked = locks::lock(&self.parked);
        self.expire(&mut parked);
        if parked.redirected.contains(&session) {
            tracing::debug!("dropped page stream {index} of redirected session {session:#x}");
            return;
        }
        if parked.streams.len() >= MAX_PARKED {
            tracing::warn!(
                "refused a page stream from {}: {MAX_PARKED} streams already wait for their migration",
                conn.peer
            );
            return;
        }
        parked.streams.push((session, index, conn, Instant::now()));
    }

    /// Sends the source of `p` (migration `session`) to the receiver on `port` of this host:
    /// a host agent hands each incoming VM to its own process. The page streams the source
    /// opened here are dropped; it opens them again there.
    pub fn redirect(&self, p: Pending, session: u64, port: u16) -> Result<(), MigrationError> {
        let sent = p.redirect(port);
        let mut parked = locks::lock(&self.parked);
        parked.streams.retain(|(s, ..)| *s != session);
        if parked.redirected.len() >= MAX_REDIRECTED {
            parked.redirected.pop_front();
        }
        parked.redirected.push_back(session);
        sent
    }

    /// Drops parked streams whose migration did not come within the handshake timeout.
    fn expire(&self, parked: &mut Parked) {
        let t = self.opts.handshake_timeout;
        parked.streams.retain(|(session, _, c, at)| {
            let keep = at.elapsed() < t;
            if !keep {
                tracing::warn!(
                    "refused a page stream from {}: no migration with session {session:#x} came within {t:?}",
                    c.peer
                );
            }
            keep
        });
    }

    /// Starts taking page streams for `session`.
    pub(super) fn register(&self, session: u64) -> Result<StreamSlot<'_>, MigrationError> {
        let (tx, rx) = sync_channel(2 * MAX_STREAMS as usize);
        let mut s = locks::lock(&self.sessions);
        if s.contains_key(&session) {
            return Err(protocol::ProtocolError::Malformed {
                kind: protocol::Kind::Config,
                why: format!("session {session:#x} is already under way"),
            }
            .into());
        }
        // Streams that came early go to the new migration first.
        let mut parked = locks::lock(&self.parked);
        self.expire(&mut parked);
        let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut parked.streams)
            .into_iter()
            .partition(|(s, ..)| *s == session);
        parked.streams = others;
        for (_, index, conn, _) in mine {
            let _ = tx.try_send((index, conn));
        }
        s.insert(session, tx);
        Ok(StreamSlot {
            incoming: self,
            session,
            arrivals: rx,
        })
    }

    /// The page streams `prep` announced, each checked: one per index, within the stream
    /// deadline. Strays and duplicates are refused by themselves. The slot stays the
    /// migration's: post-copy's link, made again, joins it there.
    pub(super) fn collect_streams(
        &self,
        prep: &Prepare,
    ) -> Result<(Vec<Connection>, StreamSlot<'_>), MigrationError> {
        let slot = self.register(prep.session)?;
        let deadline = Instant::now() + self.opts.stream_accept_timeout;
        let want = prep.streams
            + if prep.postcopy {
                protocol::LINK_CONNS
            } else {
                0
            };
        let mut slots: Vec<Option<Connection>> = (0..want).map(|_| None).collect();
        let mut have = 0;
        while have < want {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok((i, c)) = slot.arrivals.recv_timeout(left) else {
                return Err(MigrationError::TimedOut {
                    secs: self.opts.stream_accept_timeout.as_secs_f64(),
                    waiting_for: format!("page streams ({have} of {want} connected)"),
                });
            };
            match slots.get_mut(usize::from(i)) {
                Some(s @ None) => {
                    *s = Some(c);
                    have += 1;
                }
                _ => tracing::warn!(
                    "refused page stream {i} from {}: out of range or already connected",
                    c.peer
                ),
            }
        }
        Ok((slots.into_iter().flatten().collect(), slot))
    }
}

enum Arrival {
    Control(Pending),
    Stream {
        index: u16,
        session: u64,
        conn: Connection,
    },
    Probe(Connection),
}
