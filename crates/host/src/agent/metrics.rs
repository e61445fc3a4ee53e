//! The agent's metrics in the Prometheus text format (`host serve --metrics ADDR:PORT`,
//! `GET /metrics`), through the `prometheus-client` crate: migrations in and out by outcome,
//! pages by encoding and bytes on the wire, downtime and total-time histograms, migrations in
//! flight, VMs by state. Counters count from the agent's start.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::Agent;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Migration {
    /// `in` or `out`.
    direction: &'static str,
    /// `completed`, `failed`, `unknown` (switchover outcome unknown), `busy`.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Encoding {
    encoding: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct State {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Direction {
    direction: &'static str,
}

/// The agent's metrics.
pub(super) struct Metrics {
    registry: Registry,
    migrations: Family<Migration, Counter>,
    pages: Family<Encoding, Counter>,
    bytes_on_wire: Counter,
    downtime: Histogram,
    duration: Histogram,
    in_flight: Family<Direction, Gauge>,
    vms: Family<State, Gauge>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("livemig");
        let migrations = Family::<Migration, Counter>::default();
        registry.register(
            "migrations",
            "Migrations into and out of this host, by outcome",
            migrations.clone(),
        );
        let pages = Family::<Encoding, Counter>::default();
        registry.register(
            "migration_pages",
            "Pages migrations out of this host sent, by how each was encoded",
            pages.clone(),
        );
        let bytes_on_wire = Counter::default();
        registry.register(
            "migration_wire_bytes",
            "Bytes migrations out of this host put on the wire",
            bytes_on_wire.clone(),
        );
        // 1 ms to about 16 s.
        let downtime = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "migration_downtime_seconds",
            "The guest's pause in each completed migration out",
            downtime.clone(),
        );
        // 0.25 s to about 2 h.
        let duration = Histogram::new(exponential_buckets(0.25, 2.0, 16));
        registry.register(
            "migration_duration_seconds",
            "Total time of each completed migration out",
            duration.clone(),
        );
        let in_flight = Family::<Direction, Gauge>::default();
        registry.register(
            "migrations_in_flight",
            "Migrations under way into and out of this host",
            in_flight.clone(),
        );
        let vms = Family::<State, Gauge>::default();
        registry.register("vms", "This host's VMs by state", vms.clone());
        Metrics {
            registry,
            migrations,
            pages,
            bytes_on_wire,
            downtime,
            duration,
            in_flight,
            vms,
        }
    }

    /// A migration out that completed, with its report.
    pub fn migrated_out(&self, r: &migration::Report) {
        self.count("out", "completed");
        let p = &r.pages;
        for (encoding, n) in [
            ("normal", p.normal),
            ("zero", p.zero),
            ("compressed", p.compressed),
            ("raw_fallback", p.raw_fallback),
            ("delta", p.delta),
            ("dedup", p.dedup),
            ("dedup_host", p.dedup_host),
        ] {
            self.pages.get_or_create(&Encoding { encoding }).inc_by(n);
        }
        self.bytes_on_wire.inc_by(r.bytes_on_wire);
        self.downtime.observe(r.downtime_ms as f64 / 1e3);
        self.duration.observe(r.total_ms as f64 / 1e3);
    }

    /// A migration that ended otherwise, or one in.
    pub fn count(&self, direction: &'static str, outcome: &'static str) {
        self.migrations
            .get_or_create(&Migration { direction, outcome })
            .inc();
    }

    /// The text format, with the gauges as the agent stands now.
    fn render(&self, agent: &Agent) -> String {
        let (states, cap) = {
            let vms = locks::lock(&agent.vms);
            let states: Vec<String> = vms.values().map(|e| e.phase.name().to_string()).collect();
            (states, agent.capacity_of(&vms))
        };
        self.vms.clear();
        for s in states {
            self.vms.get_or_create(&State { state: s }).inc();
        }
        for (direction, n) in [("in", cap.inbound), ("out", cap.outbound)] {
            self.in_flight
                .get_or_create(&Direction { direction })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!("encoding the metrics: {e}");
        }
        out
    }
}

/// The metrics server: `GET /metrics` on `addr` until dropped.
pub(super) struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error, displaydoc::Display)]
/// serving metrics on {addr}: {why}
pub struct MetricsError {
    addr: String,
    why: String,
}

impl Server {
    pub fn start(agent: &Arc<Agent>, addr: &str) -> Result<Self, MetricsError> {
        let server = tiny_http::Server::http(addr).map_err(|e| MetricsError {
            addr: addr.into(),
            why: e.to_string(),
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let (s, a) = (stop.clone(), agent.clone());
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                while !s.load(Ordering::SeqCst) {
                    let Ok(Some(req)) = server.recv_timeout(Duration::from_millis(200)) else {
                        continue;
                    };
                    let reply =
                        if req.url() == "/metrics" && *req.method() == tiny_http::Method::Get {
                            let text = a.metrics.render(&a);
                            let kind = tiny_http::Header::from_bytes(
                                &b"Content-Type"[..],
                                &b"text/plain; version=0.0.4; charset=utf-8"[..],
                            );
                            let mut r = tiny_http::Response::from_string(text);
                            if let Ok(h) = kind {
                                r.add_header(h);
                            }
                            r
                        } else {
                            tiny_http::Response::from_string("only GET /metrics\n")
                                .with_status_code(404)
                        };
                    let _ = req.respond(reply);
                }
            })
            .map_err(|e| MetricsError {
                addr: addr.into(),
                why: e.to_string(),
            })?;
        Ok(Server {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
