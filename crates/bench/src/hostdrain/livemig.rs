//! livemig's side of the drain bench: a host agent in each testbed host, the VMs started on
//! A through its agent, each drain run by the drain library as `livemig drain` runs it.
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drain::predict::VmFacts;
use drain::{Budget, Destination, DrainOptions, DrainReport};
use host::child::{AgentProcess, Livemig};
use host::RunRequest;

use super::{Config, DrainBenchOptions, DrainOutcome, Drainer, How, VmRun, VmSpec};
use crate::testbed::Testbed;
use crate::{step, BenchError, Route};

/// Where both agents take migrations, in their own host.
const PORT: u16 = 7000;
/// How long the VMs have to boot.
const BOOT_WITHIN: Duration = Duration::from_secs(180);

pub struct LivemigHosts {
    a: AgentProcess,
    b: AgentProcess,
    request: migration::MigrateRequest,
    dedup_cache: u64,
    vms: Vec<VmSpec>,
    /// What sampling found of each VM, kept from the drain that sampled it.
    facts: HashMap<String, VmFacts>,
}

/// Where an agent keeps what its migrations cost its CPU.
const COSTS: &str = "cpu-costs.json";

impl LivemigHosts {
    /// Credentials for both hosts, an agent in each, and the VMs on A.
    pub fn start(o: &DrainBenchOptions, tb: &Testbed, dir: &Path) -> Result<Self, BenchError> {
        let tls = dir.join("tls");
        if o.tls {
            transport::tls::init_cluster(&tls, &["a".into(), "b".into()])
                .map_err(|e| step("TLS credentials")(e.to_string()))?;
        }
        let exe = |host: &str| -> Result<Livemig, BenchError> {
            if !o.tls {
                return Ok(Livemig::new(&o.livemig).insecure());
            }
            Ok(
                Livemig::new(&o.livemig).with_tls(&transport::tls::TlsFiles {
                    cert: tls.join(format!("{host}.pem")),
                    key: tls.join(format!("{host}.key")),
                    ca: tls.join("ca.pem"),
                }),
            )
        };
        let agent = |host: &str, ns: &str| -> Result<AgentProcess, BenchError> {
            let d = dir.join(format!("agent-{host}"));
            // A host keeps what it learnt of its CPU across restarts; so does the bench's.
            let costs = std::fs::read(d.join(COSTS)).ok();
            let _ = std::fs::remove_dir_all(&d);
            if let Some(c) = costs {
                std::fs::create_dir_all(&d)?;
                std::fs::write(d.join(COSTS), c)?;
            }
            exe(host)?
                .host_serve(Some(ns), &format!("0.0.0.0:{PORT}"), &d, &["--name", host])
                .map_err(step(format!("host agent {host}")))
        };
        let hosts = LivemigHosts {
            a: agent("a", &tb.host_a)?,
            b: agent("b", &tb.host_b)?,
            request: o.request.clone(),
            dedup_cache: o.dedup_cache,
            vms: o.vms.clone(),
            facts: HashMap::new(),
        };
        hosts.boot()?;
        Ok(hosts)
    }

    /// Starts every VM on A and waits for each guest's first heartbeat.
    fn boot(&self) -> Result<(), BenchError> {
        let client = self.a.client().waiting(Duration::from_secs(90));
        for v in &self.vms {
            let c = &v.content;
            let mut args = vec![
                "--workload".into(),
                v.workload.clone(),
                "--memory-profile".into(),
                c.profile.to_string(),
                "--seed".into(),
                c.seed.to_string(),
            ];
            args.extend(c.image.iter().flat_map(|i| i.run_args()));
            client
                .run(&RunRequest {
                    name: v.name.clone(),
                    memory: v.memory,
                    vcpus: 1,
                    devices: Vec::new(),
                    args,
                })
                .map_err(|e| step(format!("starting VM {}", v.name))(e.to_string()))?;
        }
        let t = Instant::now();
        while !self
            .a
            .client()
            .list()
            .is_ok_and(|l| l.iter().all(|v| v.heartbeat >= 1))
        {
            if t.elapsed() > BOOT_WITHIN {
                return Err(step("booting the VMs")(format!(
                    "not every guest sent a heartbeat within {BOOT_WITHIN:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// What sampling found of every VM (for QEMU's rows and the model), as QEMU sends it:
    /// re-sent pages whole (its XBZRLE is off by default).
    pub fn facts(&self) -> Vec<VmFacts> {
        let mut f: Vec<VmFacts> = self
            .facts
            .values()
            .map(|v| VmFacts {
                delta: false,
                cached: 0.0,
                whole_costs: None,
                whole_in_copy: None,
                // QEMU sends every page it holds twice whole.
                self_dup: 0.0,
                vcpus: 1,
                // QEMU's vCPUs do not yield to its migrations.
                dirty_ratio: 1.0,
                ..v.clone()
            })
            .collect();
        f.sort_by(|a, b| a.name.cmp(&b.name));
        f
    }

    fn options(
        &self,
        cfg: &Config,
        route: &Route,
        from: &AgentProcess,
        to: &AgentProcess,
    ) -> DrainOptions {
        let How::Livemig(transport) = cfg.how else {
            unreachable!("livemig drains only livemig configurations")
        };
        let pairs = route.pairs();
        let network = (pairs.len() > 1).then(|| {
            pairs
                .iter()
                .map(|(l, r)| format!("{l}>{r}"))
                .collect::<Vec<_>>()
                .join(",")
        });
        DrainOptions {
            from: from.sock.clone(),
            to: vec![Destination::Agent {
                sock: to.sock.clone(),
                address: Some(format!("{}:{PORT}", pairs[0].1)),
            }],
            request: migration::MigrateRequest {
                transport: Some(transport),
                network,
                ..self.request.clone()
            },
            concurrency: cfg.concurrency,
            order: cfg.order,
            budget: Budget {
                reserve_cpu: cfg.reserve_cpu,
                ..Budget::default()
            },
            retries: 1,
            dedup_cache: self.dedup_cache,
            dry_run: false,
            probe_ms: PROBE_MS,
            sample_ms: SAMPLE_MS,
            show: drain::view::Show::Off,
            interrupted: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The drain's outcome; `delta`: its migrations sent re-sent pages as deltas.
    /// `dedup`: a page the VM holds twice went as a reference.
    fn outcome(&mut self, r: &DrainReport, delta: bool, dedup: bool) -> DrainOutcome {
        let vcpu_yield = self.request.vcpu_yield != Some(false);
        let vms = r
            .vms
            .iter()
            .map(|v| VmRun {
                name: v.name.clone(),
                memory: v.memory,
                start_ms: v.start_ms.unwrap_or(0),
                end_ms: v.end_ms.unwrap_or(0),
                downtime_ms: v.report.as_ref().map(|x| x.downtime_ms),
                cpu_seconds: v.report.as_ref().map(|x| {
                    x.cpu_seconds.source
                        + x.cpu_seconds.destination
                        + x.compression.as_ref().map_or(0.0, |c| c.codec_cpu_seconds)
                }),
                codec_cpu_seconds: v
                    .report
                    .as_ref()
                    .and_then(|x| Some(x.compression.as_ref()?.codec_cpu_seconds)),
                moved: v.status == drain::Status::Moved,
                verified: v.guest_verified,
                error: v.error.clone().filter(|_| v.status != drain::Status::Moved),
                stop_reason: v.report.as_ref().map(|x| x.stop_reason.clone()),
                throttle_pct_max: v.report.as_ref().map(|x| x.throttle_pct_max),
            })
            .collect();
        // In the order the drain started them (its plan's), as the model runs them.
        let mut by_start: Vec<&drain::report::VmOutcome> = r.vms.iter().collect();
        by_start.sort_by_key(|v| v.start_ms.unwrap_or(u64::MAX));
        let mut facts: Vec<VmFacts> = by_start
            .iter()
            .map(|v| VmFacts {
                name: v.name.clone(),
                memory: v.memory,
                sample: v.sample.clone(),
                delta,
                cached: 0.0,
                whole_costs: None,
                whole_in_copy: None,
                self_dup: v
                    .sample
                    .as_ref()
                    .filter(|_| dedup)
                    .map_or(0.0, |s| drain::predict::self_dup_share(&s.fingerprint)),
                // The bench's VMs have one each.
                vcpus: 1,
                needs: Default::default(),
                // As the drain's migrations ran: hybrid, unless their report says otherwise.
                postcopy: migration::policy::DEFAULT_POSTCOPY,
                dirty_ratio: match (&r.plan.raw, v.started_raw) {
                    (Some(raw), true) => raw.dirty_ratio.unwrap_or(r.plan.dirty_ratio),
                    _ => r.plan.dirty_ratio,
                },
            })
            .collect();
        let raw = by_start.iter().map(|v| v.started_raw).collect();
        let cache = r.dedup_cache_bytes > 0;
        if cache {
            // One destination: its cache served the VMs in the order they started.
            drain::cache::expect_hits(&mut facts);
        }
        for f in facts.iter().filter(|f| f.sample.is_some()) {
            self.facts.insert(f.name.clone(), f.clone());
        }
        DrainOutcome {
            makespan_ms: r.makespan_ms,
            vms,
            concurrency_used: r.plan.concurrency_used,
            peak: r.peak_concurrency,
            survey_s: r.survey_ms as f64 / 1e3,
            facts,
            cpu: r.plan.cpu.clone(),
            vcpu_yield,
            path_bps: r.plan.link_bits_per_s.first().copied().flatten(),
            path_is_floor: r.plan.link_is_floor.first().copied().unwrap_or(false),
            cache,
            overhead_s: r.plan.overhead_s,
            raw,
            raw_cpu: r.plan.raw.as_ref().map(|x| x.cpu.clone()),
            detail: without_fingerprints(serde_json::to_value(r).unwrap_or_default()),
        }
    }
}

/// A drain report as JSON with its VMs' fingerprints counted, not listed: they are most of
/// its bytes, and each VM's `cache_hits_expected` already says what the model made of them.
fn without_fingerprints(mut report: serde_json::Value) -> serde_json::Value {
    let vms = report
        .get_mut("vms")
        .and_then(serde_json::Value::as_array_mut);
    for v in vms.into_iter().flatten() {
        if let Some(s) = v
            .get_mut("sample")
            .and_then(serde_json::Value::as_object_mut)
        {
            let keys = s
                .remove("fingerprint")
                .and_then(|k| Some(k.as_array()?.len()));
            s.remove("fingerprint_costs");
            s.insert("fingerprint_keys".into(), keys.unwrap_or(0).into());
        }
    }
    report
}

/// Each VM is sampled this long before its drain (the order and the model need it).
const SAMPLE_MS: u64 = 500;
/// The link is probed this long before each drain, with the VMs running.
const PROBE_MS: u64 = 1000;

impl Drainer for LivemigHosts {
    fn peer(&self) -> &'static str {
        "livemig"
    }

    fn learns_costs(&self) -> bool {
        true
    }

    fn on_a(&self) -> bool {
        let n = |a: &AgentProcess| a.client().list().map_or(0, |l| l.len());
        n(&self.a) >= n(&self.b)
    }

    fn fresh_guests(&mut self) -> Result<(), BenchError> {
        for agent in [&self.a, &self.b] {
            let client = agent.client();
            let running = client
                .list()
                .map_err(|e| step("listing the VMs")(e.to_string()))?;
            for v in running {
                client
                    .stop(&v.name)
                    .map_err(|e| step(format!("stopping VM {}", v.name))(e.to_string()))?;
            }
        }
        self.boot()
    }

    fn drain(&mut self, cfg: &Config, route: &Route) -> Result<DrainOutcome, BenchError> {
        let (from, to) = if route.from_a {
            (&self.a, &self.b)
        } else {
            (&self.b, &self.a)
        };
        let opts = self.options(cfg, route, from, to);
        let r =
            drain::drain(&opts).map_err(|e| step(format!("drain {}", cfg.name))(e.to_string()))?;
        let dedup = opts.request.dedup != Some(false)
            && opts.request.transport != Some(migration::protocol::Transport::Direct);
        Ok(self.outcome(&r, opts.request.sends_deltas(), dedup))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_keeps_its_samples_but_counts_their_fingerprints() {
        let report = serde_json::json!({
            "vms": [
                {"name": "a", "sample": {"touched_bytes": 8192, "fingerprint": [1, 2, 3],
                    "fingerprint_costs": [[1, 2], [3, 4], [5, 6]]}},
                {"name": "b", "sample": null},
            ],
            "makespan_ms": 10,
        });
        let out = without_fingerprints(report);
        assert_eq!(
            out["vms"][0]["sample"],
            serde_json::json!({"touched_bytes": 8192, "fingerprint_keys": 3})
        );
        assert!(out["vms"][1]["sample"].is_null());
        assert_eq!(out["makespan_ms"], 10);
    }
}
