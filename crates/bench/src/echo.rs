//! The VM network's client: UDP echo requests at a steady rate from the client namespace to
//! a guest, each stamped with its sequence number, and the round trip of each reply. What a
//! user on the VM network sees of a migration: the longest silence, the requests lost.
use std::net::{SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::netns::{spawn_in, NetnsError};

/// The most requests one client records (a bound on its memory: 10 minutes at 1 kHz).
const MAX_REQUESTS: usize = 600_000;

/// What the client saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EchoRecord {
    pub sent: u64,
    pub received: u64,
    /// Per request: when it was sent (ms from the start) and its round trip (ms), if answered.
    pub requests: Vec<(f64, Option<f64>)>,
    /// When each reply arrived (ms from the start), in order.
    pub replies: Vec<f64>,
}

impl EchoRecord {
    pub fn lost(&self) -> u64 {
        self.sent - self.received.min(self.sent)
    }

    /// The longest time without a reply, between the first and the last (ms).
    pub fn longest_gap_ms(&self) -> f64 {
        longest_gap(&self.replies)
    }

    /// Whether a reply came after `t_ms`.
    pub fn answered_after(&self, t_ms: f64) -> bool {
        self.replies.last().is_some_and(|&r| r > t_ms)
    }
}

/// What the client saw between two instants.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Window {
    /// Requests sent in the window.
    pub sent: u64,
    /// Those never answered.
    pub lost: u64,
    /// The longest time without a reply: from the last reply before the window, between the
    /// replies in it, and to its end if none came after the last.
    pub longest_gap_ms: f64,
}

impl EchoRecord {
    pub fn window(&self, from_ms: f64, to_ms: f64) -> Window {
        let in_window = |t: f64| t >= from_ms && t <= to_ms;
        let sent: Vec<_> = self.requests.iter().filter(|r| in_window(r.0)).collect();
        let before = self.replies.iter().copied().rfind(|&t| t < from_ms);
        let mut times: Vec<f64> = before.into_iter().collect();
        times.extend(self.replies.iter().copied().filter(|&t| in_window(t)));
        times.push(to_ms);
        if times.len() == 1 {
            times.insert(0, from_ms);
        }
        Window {
            sent: sent.len() as u64,
            lost: sent.iter().filter(|r| r.1.is_none()).count() as u64,
            longest_gap_ms: longest_gap(&times),
        }
    }

    /// (send time less `origin`, round trip) of each request sent between `from_ms` and
    /// `to_ms`; None: never answered.
    pub fn round_trips(&self, from_ms: f64, to_ms: f64, origin: f64) -> Vec<(f64, Option<f64>)> {
        self.requests
            .iter()
            .filter(|r| r.0 >= from_ms && r.0 <= to_ms)
            .map(|&(t, rtt)| (t - origin, rtt))
            .collect()
    }
}

/// The longest interval between consecutive times.
pub fn longest_gap(times: &[f64]) -> f64 {
    times.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max)
}

/// A client running on its own thread in the client namespace.
pub struct EchoClient {
    pub t0: Instant,
    stop: Arc<AtomicBool>,
    /// When the last reply came (µs from the start; 0: none yet).
    last_reply: Arc<AtomicU64>,
    handle: JoinHandle<Result<EchoRecord, NetnsError>>,
}

impl EchoClient {
    /// Sends `rate_hz` requests a second from namespace `ns` to `target` until finished.
    pub fn start(ns: &str, target: SocketAddrV4, rate_hz: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let last_reply = Arc::new(AtomicU64::new(0));
        let (s, last) = (stop.clone(), last_reply.clone());
        let t0 = Instant::now();
        let handle = spawn_in(ns, move || run(target, rate_hz.max(1), t0, &s, &last));
        EchoClient {
            t0,
            stop,
            last_reply,
            handle,
        }
    }

    /// When the last reply came (ms from the start), while the client runs.
    pub fn last_reply_ms(&self) -> Option<f64> {
        match self.last_reply.load(Ordering::Acquire) {
            0 => None,
            us => Some(us as f64 / 1e3),
        }
    }

    /// Milliseconds since the client started (to mark events on its record).
    pub fn now_ms(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * 1e3
    }

    pub fn finish(self) -> Result<EchoRecord, NetnsError> {
        self.stop.store(true, Ordering::Release);
        self.handle.join().map_err(|_| NetnsError::Panicked)?
    }
}

fn run(
    target: SocketAddrV4,
    rate_hz: u32,
    t0: Instant,
    stop: &AtomicBool,
    last_reply: &AtomicU64,
) -> Result<EchoRecord, NetnsError> {
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(NetnsError::work("echo client socket"))?;
    sock.set_nonblocking(true)
        .map_err(NetnsError::work("echo client socket"))?;
    let period = Duration::from_secs(1) / rate_hz;
    let ms = |t: Instant| t.duration_since(t0).as_secs_f64() * 1e3;
    let mut r = EchoRecord::default();
    let mut next = Instant::now();
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        if now >= next && r.requests.len() < MAX_REQUESTS {
            let seq = r.requests.len() as u64;
            let mut msg = [0u8; 16];
            msg[..8].copy_from_slice(&seq.to_le_bytes());
            msg[8..].copy_from_slice(b"livemig!");
            // A full socket buffer or no route yet (ARP) is a request lost, as for any client.
            let _ = sock.send_to(&msg, target);
            r.requests.push((ms(now), None));
            r.sent += 1;
            next += period;
            if next < now {
                next = now + period;
            }
        }
        loop {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) if n >= 8 && from == std::net::SocketAddr::V4(target) => {
                    let at = Instant::now();
                    let seq = u64::from_le_bytes(buf[..8].try_into().unwrap_or_default());
                    if let Some(req) = r.requests.get_mut(seq as usize) {
                        if req.1.is_none() {
                            req.1 = Some(ms(at) - req.0);
                            r.received += 1;
                            r.replies.push(ms(at));
                            let us = at.duration_since(t0).as_micros() as u64;
                            last_reply.store(us.max(1), Ordering::Release);
                        }
                    }
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(NetnsError::work("echo client receive")(e)),
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_gap_is_between_replies() {
        assert_eq!(longest_gap(&[]), 0.0);
        assert_eq!(longest_gap(&[5.0]), 0.0);
        assert_eq!(longest_gap(&[1.0, 2.0, 9.5, 10.0]), 7.5);
        let r = EchoRecord {
            sent: 4,
            received: 3,
            requests: vec![],
            replies: vec![1.0, 3.0, 4.0],
        };
        assert_eq!(r.lost(), 1);
        assert!(r.answered_after(3.5));
        assert!(!r.answered_after(4.0));
    }

    #[test]
    fn a_window_counts_its_requests_and_the_silence_across_it() {
        // Requests every 1 ms from 0 to 19; those sent at 8..=12 are lost (a switchover).
        let requests: Vec<_> = (0..20)
            .map(|i| (f64::from(i), (!(8..=12).contains(&i)).then_some(0.5)))
            .collect();
        let replies: Vec<f64> = requests
            .iter()
            .filter_map(|r| r.1.map(|rtt| r.0 + rtt))
            .collect();
        let r = EchoRecord {
            sent: 20,
            received: replies.len() as u64,
            requests,
            replies,
        };
        let w = r.window(5.0, 15.0);
        assert_eq!(w.sent, 11);
        assert_eq!(w.lost, 5);
        assert_eq!(w.longest_gap_ms, 6.0); // 7.5 -> 13.5
                                           // Silence until the window's end counts: nothing answered after 7.5 in [5, 12].
        assert_eq!(r.window(5.0, 12.0).longest_gap_ms, 4.5);
        // A window before any reply is all silence.
        let none = EchoRecord::default();
        assert_eq!(none.window(2.0, 7.0).longest_gap_ms, 5.0);
        let rt = r.round_trips(7.0, 9.0, 8.0);
        assert_eq!(rt, vec![(-1.0, Some(0.5)), (0.0, None), (1.0, None)]);
    }
}
