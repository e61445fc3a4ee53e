//! How much a link carries now: filler sent to another agent's migration address for a
//! while, counted as TCP acknowledged it (so TLS and buffering do not inflate it). The
//! receiving side reads and drops it (bounded in number and time, see `migration::Incoming`).
use std::io::Write;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use sched::ThreadTimes;
use transport::Security;

/// Longest probe an agent runs.
pub const MAX_PROBE: Duration = Duration::from_secs(10);
/// Probes shorter than this measure mostly slow start.
pub const MIN_PROBE: Duration = Duration::from_millis(200);
/// Probe streams one request may run at once, over all its paths (a receiving agent takes
/// as many).
pub const MAX_PROBE_STREAMS: usize = 4;

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ProbeError {
    /// probing {to}: {source}
    Connect {
        to: String,
        source: transport::TransportError,
    },
    /// probing {to}: {source}
    Io { to: String, source: std::io::Error },
    /// {streams} probe streams over {paths} paths asked for: at most {max} in all, at least one per path
    Streams {
        streams: usize,
        paths: usize,
        max: usize,
    },
}

/// What a probe measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measured {
    /// What the link carried, as TCP acknowledged it.
    pub bits_per_s: f64,
    /// The sending streams' mean share of the window on a core or waiting for one (None: the
    /// kernel did not say). Near 1 on either end, the cores held the probe back, not the
    /// link: it carries at least this much, and how much more is not known.
    pub sender_runnable: Option<f64>,
    /// The receiving streams' mean share of the probe on a core or waiting for one, as the
    /// receiver reported it (None: it did not).
    pub receiver_runnable: Option<f64>,
}

/// How long the receiver's report may take once the prober has closed its side: it reads
/// what is still in flight first.
const REPORT_WAIT: Duration = Duration::from_secs(2);

/// Sends filler to `to` (from `from`, when given) for `window` after a quarter of it as
/// warm-up; what TCP acknowledged during the window, and how the sending thread spent it.
pub fn probe(
    from: Option<IpAddr>,
    to: &str,
    window: Duration,
    security: &Security,
) -> Result<Measured, ProbeError> {
    let window = window.clamp(MIN_PROBE, MAX_PROBE);
    let timeout = Duration::from_secs(5);
    let connected = match from {
        Some(l) => transport::connect_from(l, to, timeout, security),
        None => transport::connect(to, timeout, security),
    };
    let mut conn = connected.map_err(|source| ProbeError::Connect {
        to: to.into(),
        source,
    })?;
    let io = |source| ProbeError::Io {
        to: to.into(),
        source,
    };
    conn.set_peer_timeout(Some(timeout)).map_err(io)?;
    let handle = conn.shutdown_handle().map_err(io)?;
    migration::protocol::write_probe_hello(&mut conn.writer)
        .map_err(|e| io(std::io::Error::other(e)))?;
    let filler = vec![0u8; 256 << 10];
    let warmup = window / 4;
    let t0 = Instant::now();
    let mut start: Option<(Instant, u64, Option<ThreadTimes>)> = None;
    while t0.elapsed() < warmup + window {
        conn.writer.write_all(&filler).map_err(io)?;
        if start.is_none() && t0.elapsed() >= warmup {
            let acked = handle.delivered().map_err(io)?.0;
            start = Some((Instant::now(), acked, ThreadTimes::current()));
        }
    }
    let spent = ThreadTimes::current();
    let _ = conn.writer.flush();
    let (acked_end, end) = (handle.delivered().map_err(io)?.0, Instant::now());
    let receiver = receiver_report(&mut conn);
    conn.shutdown();
    let (t, acked, times) = start.unwrap_or((t0, 0, None));
    let wall = end.duration_since(t);
    let secs = wall.as_secs_f64().max(1e-3);
    Ok(Measured {
        bits_per_s: acked_end.saturating_sub(acked) as f64 * 8.0 / secs,
        sender_runnable: times
            .zip(spent)
            .map(|(t0, t1)| t1.since(&t0).runnable_share(wall)),
        receiver_runnable: receiver.map(|r| r.runnable_share()),
    })
}

/// Ends the filler and reads the receiver's report on it (None: it gave none, as an agent
/// from before reports does not).
fn receiver_report(conn: &mut transport::Connection) -> Option<migration::protocol::ProbeReport> {
    conn.close_write().ok()?;
    conn.set_read_timeout(Some(REPORT_WAIT)).ok()?;
    migration::protocol::read_probe_report(&mut conn.reader)
        .map_err(|e| tracing::debug!("no report from the probe's receiver: {e}"))
        .ok()
}

/// Probes several paths at once (the NIC pairs of a multichannel migration), with `streams`
/// streams on each (as that many migrations at once would use them): their sum, and their
/// mean runnable share.
pub fn probe_paths(
    paths: &[(Option<IpAddr>, String)],
    streams: usize,
    window: Duration,
    security: &Security,
) -> Result<Measured, ProbeError> {
    let total = paths.len().saturating_mul(streams);
    if streams == 0 || total > MAX_PROBE_STREAMS {
        return Err(ProbeError::Streams {
            streams: total,
            paths: paths.len(),
            max: MAX_PROBE_STREAMS,
        });
    }
    std::thread::scope(|s| {
        let runs: Vec<_> = paths
            .iter()
            .flat_map(|p| std::iter::repeat_n(p, streams))
            .map(|(from, to)| s.spawn(move || probe(*from, to, window, security)))
            .collect();
        let each = runs
            .into_iter()
            .map(|r| {
                r.join().unwrap_or(Ok(Measured {
                    bits_per_s: 0.0,
                    sender_runnable: None,
                    receiver_runnable: None,
                }))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Measured {
            bits_per_s: each.iter().map(|m| m.bits_per_s).sum(),
            sender_runnable: mean(each.iter().map(|m| m.sender_runnable)),
            receiver_runnable: mean(each.iter().map(|m| m.receiver_runnable)),
        })
    })
}

/// The mean of values all known (None if one is not).
fn mean(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let all: Vec<f64> = values.collect::<Option<_>>()?;
    (!all.is_empty()).then(|| all.iter().sum::<f64>() / all.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_runs_at_least_one_stream_per_path_and_at_most_four_in_all() {
        let paths = vec![(None, "127.0.0.1:9".to_string()); 2];
        let window = Duration::from_millis(200);
        for streams in [0, 3] {
            let e = probe_paths(&paths, streams, window, &Security::Insecure).unwrap_err();
            assert!(
                matches!(
                    e,
                    ProbeError::Streams {
                        paths: 2,
                        max: MAX_PROBE_STREAMS,
                        ..
                    }
                ),
                "{e}"
            );
        }
    }
}
