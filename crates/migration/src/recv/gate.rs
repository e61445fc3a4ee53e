//! Who may hold a connection on a listener, and for how long. Connections that have not
//! proved who they are (TLS not done; with `--insecure`, no hello yet) share a bounded pool
//! with a limit per source address: a source over its limit loses its own oldest connection,
//! and when the pool is full the source holding the most loses its oldest. A new source
//! always gets a slot, so whoever floods from one address, or a few, cannot keep a cluster
//! member out. Peers that have authenticated have a pool of their own. Every slot has a
//! deadline, and a sweeper closes the connections past theirs: the whole handshake, TLS
//! included, is bounded, however slowly its bytes come.
use std::net::{IpAddr, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How many connections a listener holds at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections that have not authenticated yet, in all.
    pub pre_auth: usize,
    /// Of those, from one source address.
    pub per_source: usize,
    /// Authenticated connections still opening (the hello) or offering a VM.
    pub authenticated: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            pre_auth: 128,
            per_source: 8,
            authenticated: 64,
        }
    }
}

/// An unauthenticated connection, as the policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub id: u64,
    pub source: IpAddr,
    pub since: Instant,
}

/// What to do with a new unauthenticated connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Enter,
    /// Enter after closing the connection with this id.
    Evict(u64),
}

/// The policy: a new connection from `source` always enters; it costs its own source's
/// oldest connection when that source holds `per_source` already, or, when the pool is full,
/// the oldest connection of the source that holds the most (ties: the one whose oldest is
/// oldest).
pub fn admit(held: &[Held], source: IpAddr, limits: &Limits) -> Admission {
    let oldest_of = |ip: IpAddr| {
        held.iter()
            .filter(|h| h.source == ip)
            .min_by_key(|h| (h.since, h.id))
    };
    let count = |ip: IpAddr| held.iter().filter(|h| h.source == ip).count();
    if count(source) >= limits.per_source.max(1) {
        return oldest_of(source).map_or(Admission::Enter, |h| Admission::Evict(h.id));
    }
    if held.len() < limits.pre_auth.max(1) {
        return Admission::Enter;
    }
    let victim = held
        .iter()
        .map(|h| h.source)
        .max_by_key(|ip| {
            let oldest = oldest_of(*ip).map(|h| std::cmp::Reverse((h.since, h.id)));
            (count(*ip), oldest)
        })
        .and_then(oldest_of);
    victim.map_or(Admission::Enter, |h| Admission::Evict(h.id))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pool {
    PreAuth,
    Authenticated,
}

struct Slot {
    held: Held,
    pool: Pool,
    deadline: Option<Instant>,
    /// A clone of the connection's socket, to close it.
    socket: TcpStream,
}

impl Slot {
    fn close(&self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

#[derive(Default)]
struct State {
    slots: Vec<Slot>,
    next: u64,
    stopped: bool,
    /// Connections closed to make room, and past their deadline (for the log).
    evicted: u64,
    expired: u64,
}

impl State {
    fn count(&self, pool: Pool) -> usize {
        self.slots.iter().filter(|s| s.pool == pool).count()
    }

    fn remove(&mut self, id: u64) -> Option<Slot> {
        let i = self.slots.iter().position(|s| s.held.id == id)?;
        Some(self.slots.swap_remove(i))
    }
}

/// A listener's connection slots (see the module's doc).
pub struct Gate {
    limits: Limits,
    state: Mutex<State>,
    /// Woken when a deadline is set or the gate stops.
    changed: Condvar,
}

/// Why a connection got no slot.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum GateError {
    /// cloning the connection's socket: {0}
    Socket(std::io::Error),
    /// {0} authenticated connections are opening at once already
    Full(usize),
}

impl Gate {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Gate {
            limits,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        })
    }

    /// A new connection from `source`: a slot among the unauthenticated, closing another
    /// connection if the policy says so. It must finish authenticating within `within`.
    pub fn enter(
        self: &Arc<Self>,
        socket: &TcpStream,
        source: IpAddr,
        within: Duration,
    ) -> Result<Ticket, GateError> {
        let socket = socket.try_clone().map_err(GateError::Socket)?;
        let mut st = locks::lock(&self.state);
        let held: Vec<Held> = st
            .slots
            .iter()
            .filter(|s| s.pool == Pool::PreAuth)
            .map(|s| s.held)
            .collect();
        if let Admission::Evict(victim) = admit(&held, source, &self.limits) {
            if let Some(v) = st.remove(victim) {
                v.close();
                st.evicted += 1;
                tracing::debug!(
                    "closed an unauthenticated connection from {} to make room for one from {source}",
                    v.held.source
                );
            }
        }
        let id = st.next;
        st.next += 1;
        let now = Instant::now();
        st.slots.push(Slot {
            held: Held {
                id,
                source,
                since: now,
            },
            pool: Pool::PreAuth,
            deadline: Some(now + within),
            socket,
        });
        self.changed.notify_all();
        Ok(Ticket {
            gate: self.clone(),
            id,
        })
    }

    /// Closes connections past their deadline until [`Self::stop`]; run on a thread of its own.
    pub fn sweep(&self) {
        let mut st = locks::lock(&self.state);
        while !st.stopped {
            let now = Instant::now();
            let (expired, live): (Vec<Slot>, Vec<Slot>) = std::mem::take(&mut st.slots)
                .into_iter()
                .partition(|s| s.deadline.is_some_and(|d| d <= now));
            st.slots = live;
            for s in &expired {
                s.close();
                tracing::debug!(
                    "closed a connection from {}: past its deadline to authenticate and open",
                    s.held.source
                );
            }
            st.expired += expired.len() as u64;
            let next = st.slots.iter().filter_map(|s| s.deadline).min();
            let wait = next.map_or(Duration::from_secs(1), |d| d.saturating_duration_since(now));
            st = locks::wait_timeout(&self.changed, st, wait.max(Duration::from_millis(1)));
        }
    }

    /// Ends [`Self::sweep`].
    pub fn stop(&self) {
        locks::lock(&self.state).stopped = true;
        self.changed.notify_all();
    }

    /// Connections held now, unauthenticated and authenticated.
    pub fn held(&self) -> (usize, usize) {
        let st = locks::lock(&self.state);
        (st.count(Pool::PreAuth), st.count(Pool::Authenticated))
    }

    /// Connections closed so far to make room, and past their deadline.
    pub fn closed(&self) -> (u64, u64) {
        let st = locks::lock(&self.state);
        (st.evicted, st.expired)
    }
}

/// A connection's slot; given back when dropped.
pub struct Ticket {
    gate: Arc<Gate>,
    id: u64,
}

impl Ticket {
    /// The peer proved who it is: its slot moves to the authenticated pool, to finish opening
    /// within `within` (None: no deadline). Fails when that pool is full (the slot is given
    /// back) or when this connection was already closed to make room or for its deadline.
    pub fn authenticated(self, within: Option<Duration>) -> Result<Ticket, GateError> {
        let g = &self.gate;
        let mut st = locks::lock(&g.state);
        let full = st.count(Pool::Authenticated) >= g.limits.authenticated;
        let slot = st
            .slots
            .iter_mut()
            .find(|s| s.held.id == self.id)
            .ok_or_else(|| {
                GateError::Socket(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the connection was closed: past its deadline, or to make room",
                ))
            })?;
        if full {
            return Err(GateError::Full(g.limits.authenticated));
        }
        slot.pool = Pool::Authenticated;
        slot.deadline = within.map(|w| Instant::now() + w);
        g.changed.notify_all();
        drop(st);
        Ok(self)
    }

    /// A new deadline for this connection (None: none).
    pub fn set_deadline(&self, within: Option<Duration>) {
        let g = &self.gate;
        let mut st = locks::lock(&g.state);
        if let Some(s) = st.slots.iter_mut().find(|s| s.held.id == self.id) {
            s.deadline = within.map(|w| Instant::now() + w);
        }
        g.changed.notify_all();
    }

    /// Whether the gate closed this connection (to make room, or past its deadline).
    pub fn was_closed(&self) -> bool {
        !locks::lock(&self.gate.state)
            .slots
            .iter()
            .any(|s| s.held.id == self.id)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        locks::lock(&self.gate.state).remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn held(spec: &[(u8, u64)]) -> Vec<Held> {
        let t0 = Instant::now();
        spec.iter()
            .enumerate()
            .map(|(i, &(src, age_ms))| Held {
                id: i as u64,
                source: ip(src),
                since: t0 - Duration::from_millis(age_ms),
            })
            .collect()
    }

    const L: Limits = Limits {
        pre_auth: 4,
        per_source: 2,
        authenticated: 2,
    };

    #[test]
    fn a_connection_enters_while_there_is_room() {
        assert_eq!(admit(&[], ip(1), &L), Admission::Enter);
        assert_eq!(admit(&held(&[(1, 5), (2, 5)]), ip(1), &L), Admission::Enter);
    }

    #[test]
    fn a_source_over_its_limit_loses_its_own_oldest() {
        // Source 1 holds two (ids 0 and 2, 0 older): its third costs its oldest, not source 2's.
        let h = held(&[(1, 50), (2, 90), (1, 10)]);
        assert_eq!(admit(&h, ip(1), &L), Admission::Evict(0));
    }

    #[test]
    fn a_full_pool_costs_the_biggest_source_its_oldest_and_a_new_source_always_enters() {
        // Full (4): source 1 holds 2, sources 2 and 3 one each; a newcomer from source 9
        // costs source 1 its oldest (id 2), although source 2's is older still.
        let h = held(&[(2, 99), (1, 10), (1, 40), (3, 5)]);
        assert_eq!(admit(&h, ip(9), &L), Admission::Evict(2));
        // Sources holding as many: the one whose oldest is oldest gives it up.
        let h = held(&[(1, 10), (2, 30), (1, 20), (2, 5)]);
        assert_eq!(admit(&h, ip(9), &L), Admission::Evict(1));
    }

    #[test]
    fn a_flood_from_many_sources_never_keeps_a_new_one_out() {
        // 16 sources filling a pool of 128 with 8 each: every newcomer still gets a slot,
        // and no flooding source ever holds more than its limit.
        let limits = Limits::default();
        let mut h: Vec<Held> = Vec::new();
        let t0 = Instant::now();
        let mut id = 0;
        for round in 0..20u64 {
            for src in 1..=16u8 {
                let since = t0 + Duration::from_millis(round * 16 + u64::from(src));
                if let Admission::Evict(v) = admit(&h, ip(src), &limits) {
                    h.retain(|x| x.id != v);
                }
                h.push(Held {
                    id,
                    source: ip(src),
                    since,
                });
                id += 1;
            }
        }
        assert!(h.len() <= limits.pre_auth);
        assert!((1..=16).all(|s| h.iter().filter(|x| x.source == ip(s)).count() <= 8));
        assert!(matches!(admit(&h, ip(200), &limits), Admission::Evict(_)));
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    #[test]
    fn the_gate_closes_what_it_evicts_and_what_outlives_its_deadline() {
        use std::io::Read;
        let gate = Gate::new(L);
        let sweeper = {
            let g = gate.clone();
            std::thread::spawn(move || g.sweep())
        };
        let (mut c1, s1) = pair();
        let (_c2, s2) = pair();
        let (_c3, s3) = pair();
        let t1 = gate.enter(&s1, ip(1), Duration::from_secs(60)).unwrap();
        let t2 = gate.enter(&s2, ip(1), Duration::from_secs(60)).unwrap();
        // A third from source 1 closes the first.
        let _t3 = gate.enter(&s3, ip(1), Duration::from_secs(60)).unwrap();
        assert!(t1.was_closed() && !t2.was_closed());
        assert_eq!(
            c1.read(&mut [0u8; 1]).unwrap(),
            0,
            "the evicted peer sees EOF"
        );
        // A short deadline: closed by the sweeper.
        let (mut c4, s4) = pair();
        let t4 = gate.enter(&s4, ip(2), Duration::from_millis(50)).unwrap();
        assert_eq!(c4.read(&mut [0u8; 1]).unwrap(), 0);
        assert!(t4.was_closed());
        assert_eq!(gate.closed(), (1, 1));
        // Authenticated: its own pool, bounded, without a deadline when asked.
        let t2 = t2.authenticated(None).unwrap();
        assert_eq!(gate.held(), (1, 1));
        let (_c5, s5) = pair();
        let (_c6, s6) = pair();
        let t5 = gate.enter(&s5, ip(3), Duration::from_secs(60)).unwrap();
        let t6 = gate.enter(&s6, ip(3), Duration::from_secs(60)).unwrap();
        let _t5 = t5.authenticated(None).unwrap();
        assert!(matches!(t6.authenticated(None), Err(GateError::Full(2))));
        drop(t2);
        assert_eq!(gate.held(), (1, 1));
        gate.stop();
        sweeper.join().unwrap();
    }
}
