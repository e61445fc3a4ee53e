//! How much a link carries now: filler sent to another agent's migration address for a
//! while, counted as TCP acknowledged it (so TLS and buffering do not inflate it). The
//! receiving side reads and drops it (bounded in number and time, see `migration::Incoming`).
use std::io::Write;
use std::net::IpAddr;
use std::time::{Duration, Instant};

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

/// Sends filler to `to` (from `from`, when given) for `window` after a quarter of it as
/// warm-up; returns bits per second acknowledged during the window.
pub fn probe(
    from: Option<IpAddr>,
    to: &str,
    window: Duration,
    security: &Security,
) -> Result<f64, ProbeError> {
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
    let mut start: Option<(Instant, u64)> = None;
    while t0.elapsed() < warmup + window {
        conn.writer.write_all(&filler).map_err(io)?;
        if start.is_none() && t0.elapsed() >= warmup {
            start = Some((Instant::now(), handle.delivered().map_err(io)?.0));
        }
    }
    let _ = conn.writer.flush();
    let (acked_end, end) = (handle.delivered().map_err(io)?.0, Instant::now());
    conn.shutdown();
    let (t, acked) = start.unwrap_or((t0, 0));
    let secs = end.duration_since(t).as_secs_f64().max(1e-3);
    Ok(acked_end.saturating_sub(acked) as f64 * 8.0 / secs)
}

/// Probes several paths at once (the NIC pairs of a multichannel migration), with `streams`
/// streams on each (as that many migrations at once would use them); their sum.
pub fn probe_paths(
    paths: &[(Option<IpAddr>, String)],
    streams: usize,
    window: Duration,
    security: &Security,
) -> Result<f64, ProbeError> {
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
        runs.into_iter()
            .map(|r| r.join().unwrap_or(Ok(0.0)))
            .sum::<Result<f64, _>>()
    })
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
