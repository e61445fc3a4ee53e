//! Drains the cluster orders of this host (`drain --cluster --host NAME` run elsewhere): the
//! agent runs `livemig drain` here, where its API socket is, and writes back how it went.
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use cluster::{DrainOrder, DrainState};

use super::{Agent, AgentError};

/// How often the agent looks for an order.
const ORDERS_EVERY: Duration = Duration::from_secs(1);

/// The drain process this agent runs for an order.
struct Draining {
    order: DrainOrder,
    child: Child,
    report: PathBuf,
    interrupted: bool,
}

impl Agent {
    /// In a cluster: the thread that takes this host's drain orders.
    pub(super) fn spawn_drains(self: &Arc<Self>) -> Result<Option<JoinHandle<()>>, AgentError> {
        if self.cluster.is_none() {
            return Ok(None);
        }
        let a = self.clone();
        std::thread::Builder::new()
            .name("drains".into())
            .spawn(move || {
                let mut running: Option<Draining> = None;
                while !a.stopped.load(Ordering::SeqCst) {
                    running = a.drain_tick(running);
                    std::thread::sleep(ORDERS_EVERY);
                }
            })
            .map(Some)
            .map_err(|source| AgentError::Thread {
                what: "drains",
                source,
            })
    }

    /// One look at the order: start it, pass on a cancel, or write back how it ended.
    fn drain_tick(&self, running: Option<Draining>) -> Option<Draining> {
        let c = self.cluster.as_ref()?;
        let me = &self.cfg.name;
        let order = match c.store.drain_order(me) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!("cluster: reading this host's drain order: {e}");
                return running;
            }
        };
        match (order, running) {
            (Some(o), None) if o.state == DrainState::Requested => self.start_drain(o),
            (Some(o), Some(mut r)) if o.id == r.order.id => {
                if o.cancel && !r.interrupted {
                    interrupt(&r.child);
                    r.interrupted = true;
                }
                match r.child.try_wait() {
                    Ok(Some(status)) => {
                        self.drain_ended(&o, &r.report, status.success());
                        None
                    }
                    _ => Some(r),
                }
            }
            // The order was taken away under the drain: it stops as Ctrl-C stops it.
            (_, Some(mut r)) => {
                if !r.interrupted {
                    interrupt(&r.child);
                    r.interrupted = true;
                }
                match r.child.try_wait() {
                    Ok(Some(_)) => None,
                    _ => Some(r),
                }
            }
            // Taken by an agent of this host that is gone: nobody will report on it.
            (Some(o), None) if o.state == DrainState::Running => {
                let failed = DrainOrder {
                    state: DrainState::Failed,
                    summary: "the agent that ran it stopped before it ended".into(),
                    ..o.clone()
                };
                let _ = c.store.update_drain(me, &o, &failed);
                None
            }
            _ => None,
        }
    }

    fn start_drain(&self, o: DrainOrder) -> Option<Draining> {
        let c = self.cluster.as_ref()?;
        let me = &self.cfg.name;
        let report = self.cfg.dir.join(format!("drain-{:016x}.json", o.id));
        let started = self.drain_process(&o, &report);
        let (state, summary) = match &started {
            Ok(_) => (DrainState::Running, String::new()),
            Err(e) => (DrainState::Failed, format!("starting livemig drain: {e}")),
        };
        let now = DrainOrder {
            state,
            summary,
            ..o.clone()
        };
        match (c.store.update_drain(me, &o, &now), started) {
            (Ok(true), Ok(child)) => {
                tracing::info!(id = o.id, "running the drain the cluster ordered");
                Some(Draining {
                    order: now,
                    child,
                    report,
                    interrupted: false,
                })
            }
            (_, Ok(mut child)) => {
                // The order changed under us: no drain without one.
                let _ = child.kill();
                let _ = child.wait();
                None
            }
            _ => None,
        }
    }

    /// `livemig drain --host ME --report REPORT CLUSTER ARGS`, logging to DIR/drain.log.
    fn drain_process(&self, o: &DrainOrder, report: &std::path::Path) -> std::io::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.cfg.dir.join("drain.log"))?;
        let cluster = self.cfg.cluster.as_ref().map(cluster::Endpoints::args);
        self.cfg
            .livemig
            .command(None)
            .args(["drain", "--host", &self.cfg.name, "--report"])
            .arg(report)
            .args(cluster.unwrap_or_default())
            .args(&o.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
    }

    fn drain_ended(&self, o: &DrainOrder, report: &std::path::Path, ok: bool) {
        let Some(c) = self.cluster.as_ref() else {
            return;
        };
        let json: Option<serde_json::Value> = std::fs::read(report)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let summary = json
            .as_ref()
            .and_then(|j| j["summary"].as_str().map(String::from))
            .unwrap_or_else(|| {
                format!(
                    "livemig drain ended without a report (see {})",
                    self.cfg.dir.join("drain.log").display()
                )
            });
        let done = DrainOrder {
            state: if json.is_some() {
                DrainState::Done
            } else {
                DrainState::Failed
            },
            complete: ok,
            summary,
            report: json,
            ..o.clone()
        };
        if let Err(e) = c.store.update_drain(&self.cfg.name, o, &done) {
            tracing::warn!("cluster: writing back how the drain went: {e}");
        }
        let _ = std::fs::remove_file(report);
    }
}

/// SIGINT to the drain: it cancels what is in flight and starts nothing more.
fn interrupt(child: &Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) with a pid and a signal number touches no memory.
        unsafe { libc::kill(pid, libc::SIGINT) };
    }
}
