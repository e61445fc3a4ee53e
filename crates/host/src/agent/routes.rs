//! The agent's API (table in [`crate::api`]): VMs started, stopped, listed and migrated; the
//! migration routes of a VM go to its own process.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use migration::MigrateRequest;
use serde_json::{json, Value};
use unixhttp::{ApiError, Limits, Reply, Request};
use vmm::VmConfig;

use super::vms::{self, Entry, Phase, Proc, Record};
use super::{Agent, AgentError};
use crate::api::{
    CacheRequest, ProbeRequest, ProbeResult, Reach, ReachRequest, RunRequest, VmInfo,
    MAX_REACH_PATHS,
};

/// How long a new VM's process has to serve its API.
const BOOT_WITHIN: Duration = Duration::from_secs(60);
/// How long a VM asked to stop has before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a VM process whose migrate request failed unanswered has to be seen gone.
const PROCESS_GONE_WITHIN: Duration = Duration::from_secs(2);
/// Enough connections for a drain's migrations and their progress polls.
const API_CONNECTIONS: usize = 128;

pub(super) fn serve(agent: &Arc<Agent>) -> Result<unixhttp::Server, AgentError> {
    let a = agent.clone();
    let limits = Limits {
        connections: API_CONNECTIONS,
        ..Limits::default()
    };
    Ok(unixhttp::Server::start(
        &agent.api_path(),
        Arc::new(move |r: &Request| route(&a, r)),
        limits,
    )?)
}

fn route(a: &Agent, r: &Request) -> Reply {
    let (path, query) = r.path.split_once('?').unwrap_or((r.path.as_str(), ""));
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (r.method.as_str(), segs.as_slice()) {
        ("GET", ["host"]) => Ok(json!(a.capacity_of(&locks::lock(&a.vms)))),
        ("GET", ["vms"]) => Ok(json!(a.list())),
        ("GET", ["cpu"]) => Ok(json!(a.cpu_usage())),
        ("POST", ["cpu", "costs"]) => {
            let l = r
                .json::<Option<crate::cpu::Learn>>()?
                .ok_or(bad("a migration's cost"))?;
            locks::lock(&a.cpu).learn(&l);
            Ok(json!({}))
        }
        ("POST", ["vms"]) => a.run(&r.json::<Option<RunRequest>>()?.ok_or(bad("a VM to run"))?),
        ("DELETE", ["vms", n]) => a.stop(n),
        ("POST", ["vms", n, "migrate"]) => a.migrate(n, &r.body),
        (m @ ("GET" | "DELETE" | "PATCH"), ["vms", n, "migration"]) => {
            a.forward(n, m, "/vm/migration", &r.body)
        }
        ("POST", ["vms", n, "migration", "resume"]) => {
            a.forward(n, "POST", "/vm/migration/resume", &r.body)
        }
        ("POST", ["vms", n, "sample"]) => a.forward(n, "POST", "/vm/sample", &r.body),
        ("POST", ["vms", n, "resume"]) => a.resume(n),
        ("POST", ["vms", n, "discard"]) => a.discard(n),
        ("GET", ["incoming", s]) => {
            let session = parse_session(s)?;
            Ok(json!(a.fate(session, query == "abandon")))
        }
        ("POST", ["caches"]) => {
            let r = r.json::<Option<CacheRequest>>()?.ok_or(bad("bytes"))?;
            a.create_cache(r.bytes)
        }
        ("DELETE", ["caches", id]) => a.drop_cache(parse_session(id)?),
        ("POST", ["probe"]) => a.probe(&r.json::<Option<ProbeRequest>>()?.ok_or(bad("paths"))?),
        ("POST", ["reach"]) => {
            let r = r.json::<Option<ReachRequest>>()?.ok_or(bad("disks"))?;
            reach(&r.disks, &a.cfg.storage)
        }
        _ => Err((404, format!("no such endpoint: {} {}", r.method, r.path))),
    }
}

/// Which disk images a VM arriving here could not open: outside this host's storage, or not
/// a regular file it can open for writing.
fn reach(disks: &[PathBuf], storage: &[PathBuf]) -> Reply {
    if disks.len() > MAX_REACH_PATHS {
        return Err((400, format!("at most {MAX_REACH_PATHS} disks at once")));
    }
    let unreachable = disks
        .iter()
        .filter_map(|p| {
            if let Err(e) = migratable::disk_within("disk", p, storage) {
                return Some((p.clone(), e.to_string()));
            }
            let why = match std::fs::metadata(p) {
                Err(e) => e.to_string(),
                Ok(m) if !m.is_file() => "not a regular file".into(),
                Ok(_) => match std::fs::OpenOptions::new().read(true).write(true).open(p) {
                    Ok(_) => return None,
                    Err(e) => e.to_string(),
                },
            };
            Some((p.clone(), why))
        })
        .collect();
    Ok(json!(Reach { unreachable }))
}

fn bad(what: &str) -> (u16, String) {
    (400, format!("the body must give {what}"))
}

fn parse_session(s: &str) -> Result<u64, (u16, String)> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| (400, format!("{s:?} is not a session id: {e}")))
}

/// A VM API's refusal as this API's (same status and message); other failures as 502.
fn passed_on(name: &str, e: &ApiError) -> (u16, String) {
    match e {
        ApiError::Refused {
            status, message, ..
        } => (*status, message.clone()),
        _ => (502, format!("{name}'s process did not answer: {e}")),
    }
}

fn not_found(name: &str) -> (u16, String) {
    (404, format!("no VM named {name} on this host"))
}

impl Agent {
    /// The CPU its VM processes (those arriving too) have taken so far, and the host's.
    pub(super) fn cpu_usage(&self) -> crate::cpu::CpuUsage {
        let vms: Vec<(String, u32)> = locks::lock(&self.vms)
            .iter_mut()
            .map(|(name, e)| (name.clone(), e.proc.pid()))
            .collect();
        locks::lock(&self.cpu).read(&vms)
    }

    pub(super) fn list(&self) -> Vec<VmInfo> {
        let entries: Vec<(Record, Phase, PathBuf, u32)> = {
            let mut vms = locks::lock(&self.vms);
            vms.values_mut()
                .map(|e| (e.rec.clone(), e.phase.clone(), e.api(), e.proc.pid()))
                .collect()
        };
        entries
            .into_iter()
            .map(|(rec, phase, api, pid)| vm_info(rec, &phase, api, pid))
            .collect()
    }

    fn run(&self, r: &RunRequest) -> Reply {
        if let Some(a) = r.args.iter().find(|a| {
            matches!(
                a.as_str(),
                "--api"
                    | "--console"
                    | "--memory"
                    | "--vcpus"
                    | "--disk"
                    | "--net"
                    | "--cpu-features"
            )
        }) {
            return Err((400, format!("{a} is the agent's to set")));
        }
        let vm = VmConfig {
            devices: r.devices.clone(),
            ..VmConfig::new(r.memory, r.vcpus)
        };
        vm.check_devices().map_err(|e| (400, e.to_string()))?;
        vms::check_name(&r.name).map_err(|e| (400, e.to_string()))?;
        let mask = self.run_mask()?;
        let claimed = self.claim(&r.name)?;
        let started = self.start_admitted(r, &vm, &mask);
        let served = started.and_then(|api| self.wait_serving(&r.name, &api).map(|()| api));
        let api = match served {
            Ok(api) => api,
            Err(e) => {
                if claimed {
                    self.release(&r.name);
                }
                return Err(e);
            }
        };
        let mut vms = locks::lock(&self.vms);
        let e = vms.get_mut(&r.name).ok_or_else(|| not_found(&r.name))?;
        e.phase = Phase::Running;
        Ok(json!(vm_info(e.rec.clone(), &e.phase, api, e.proc.pid())))
    }

    /// Admits and starts a new VM; its API socket.
    fn start_admitted(
        &self,
        r: &RunRequest,
        vm: &VmConfig,
        mask: &[String],
    ) -> Result<PathBuf, (u16, String)> {
        let mut vms = locks::lock(&self.vms);
        self.admit(&vms, &r.name, vm, false)
            .map_err(|e| (409, e.to_string()))?;
        let e = self
            .start_vm(r, mask)
            .map_err(|e| (500, format!("starting {}: {e}", r.name)))?;
        let api = e.api();
        vms.insert(r.name.clone(), e);
        Ok(api)
    }

    fn start_vm(&self, r: &RunRequest, mask: &[String]) -> std::io::Result<Entry> {
        let dir = self.cfg.dir.join("vms").join(&r.name);
        std::fs::create_dir_all(&dir)?;
        let api = vms::api_of(&dir);
        let mut args: Vec<String> = vec![
            "run".into(),
            "--memory".into(),
            r.memory.to_string(),
            "--vcpus".into(),
            r.vcpus.to_string(),
        ];
        args.extend(crate::child::device_args(&r.devices));
        args.extend(super::inbound::mask_args(mask));
        args.extend(r.args.iter().cloned());
        args.extend([
            "--api".into(),
            api.display().to_string(),
            "--console".into(),
            dir.join("console.log").display().to_string(),
        ]);
        let child = vms::spawn(&self.cfg.livemig, &args, &dir)?;
        let e = Entry {
            rec: Record {
                name: r.name.clone(),
                memory: r.memory,
                vcpus: r.vcpus,
                origin: "local".into(),
                pid: child.id(),
                session: None,
                // What the VMM gives the guest: this host's offer less the mask.
                cpu_features: vmm::vm::host_cpu_features(mask)
                    .map(|f| f.into_iter().collect())
                    .unwrap_or_default(),
            },
            proc: Proc::Child(child),
            phase: Phase::Starting,
            dir,
        };
        e.save()?;
        Ok(e)
    }

    /// Waits for a new VM's API; a VM that fails to start is removed and its log says why.
    fn wait_serving(&self, name: &str, api: &std::path::Path) -> Result<(), (u16, String)> {
        let t = Instant::now();
        loop {
            if vmm::api::Client::new(api)
                .with_timeout(Duration::from_secs(1))
                .status()
                .is_ok()
            {
                return Ok(());
            }
            let mut vms = locks::lock(&self.vms);
            let e = vms.get_mut(name).ok_or_else(|| not_found(name))?;
            let failed = match e.proc.exited() {
                Some(how) => Some(format!("it exited ({how}): {}", e.log_tail())),
                None if t.elapsed() > BOOT_WITHIN => {
                    e.proc.kill();
                    Some(format!("its API did not answer within {BOOT_WITHIN:?}"))
                }
                None => None,
            };
            if let Some(why) = failed {
                if let Some(e) = vms.remove(name) {
                    let _ = std::fs::remove_dir_all(&e.dir);
                }
                return Err((500, format!("{name} did not start: {why}")));
            }
            drop(vms);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The API socket of `name` if its phase allows `what`.
    fn api_if(
        &self,
        name: &str,
        allowed: impl Fn(&Phase) -> bool,
        what: &str,
    ) -> Result<PathBuf, (u16, String)> {
        let vms = locks::lock(&self.vms);
        let e = vms.get(name).ok_or_else(|| not_found(name))?;
        if !allowed(&e.phase) {
            return Err((
                409,
                format!("cannot {what} {name}: it is {}", describe(&e.phase)),
            ));
        }
        Ok(e.api())
    }

    fn stop(&self, name: &str) -> Reply {
        let api = {
            let mut vms = locks::lock(&self.vms);
            let e = vms.get_mut(name).ok_or_else(|| not_found(name))?;
            if matches!(e.phase, Phase::Migrating { .. } | Phase::Arriving) {
                return Err((
                    409,
                    format!("cannot stop {name}: it is {}", describe(&e.phase)),
                ));
            }
            // Its exit from here on is the one asked for.
            e.phase = Phase::Stopping;
            e.api()
        };
        let _ = vmm::api::Client::new(&api)
            .with_timeout(Duration::from_secs(5))
            .shutdown();
        self.remove_when_gone(name);
        self.release(name);
        Ok(json!({ "stopped": name }))
    }

    /// Waits for `name`'s process to leave (killing it after a grace) and forgets it.
    fn remove_when_gone(&self, name: &str) {
        let t = Instant::now();
        loop {
            let mut vms = locks::lock(&self.vms);
            let Some(e) = vms.get_mut(name) else {
                return;
            };
            if e.proc.exited().is_some() || t.elapsed() > STOP_GRACE {
                e.proc.kill();
                e.proc.wait_exit(Duration::from_secs(5));
                if let Some(e) = vms.remove(name) {
                    self.forget(e, crate::api::IncomingFate::Confirmed);
                }
                return;
            }
            drop(vms);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Migrates `name` through its process; once it has moved, its entry goes. A failure
    /// leaves it running here, or, when the switchover's outcome is unknown (HTTP 502),
    /// `unresolved`: paused until `resume` or `discard`.
    fn migrate(&self, name: &str, body: &[u8]) -> Reply {
        let mut req: MigrateRequest =
            serde_json::from_slice(body).map_err(|e| (400, format!("a migrate request: {e}")))?;
        req.name = Some(name.to_string());
        req.origin = Some(self.cfg.name.clone());
        if let Some(s) = self.cluster_settings() {
            super::membership::apply(&s, &mut req);
        }
        req.generation = self.owns(name)?;
        let api = {
            let mut vms = locks::lock(&self.vms);
            let e = vms.get_mut(name).ok_or_else(|| not_found(name))?;
            if e.phase != Phase::Running {
                return Err((
                    409,
                    format!("cannot migrate {name}: it is {}", describe(&e.phase)),
                ));
            }
            e.phase = Phase::Migrating { to: req.to.clone() };
            e.api()
        };
        let answer = vmm::api::Client::new(&api)
            .with_timeout(Duration::from_secs(7 * 24 * 3600))
            .call::<Value>("POST", "/vm/migrate", Some(json!(req)));
        match answer {
            Ok(report) => {
                if let Ok(r) = serde_json::from_value::<migration::Report>(report.clone()) {
                    self.metrics.migrated_out(&r);
                    // Counted before its process ends, with the CPU it took.
                    self.cpu_usage();
                }
                self.remove_when_gone(name);
                Ok(report)
            }
            Err(e) => {
                self.metrics.count(
                    "out",
                    match e.status() {
                        Some(502) => "unknown",
                        Some(503) => "busy",
                        _ => "failed",
                    },
                );
                Err(self.migration_failed(name, &e))
            }
        }
    }

    /// After a failed migrate: the VM runs here again; or, when the switchover's outcome is
    /// unknown (HTTP 502), it is `unresolved`, paused until `resume` or `discard`; or its
    /// process died under the migration (HTTP 410: it is `failed`, as `host list` says, and
    /// only the destination can say whether the VM runs there).
    fn migration_failed(&self, name: &str, e: &ApiError) -> (u16, String) {
        let (status, message) = passed_on(name, e);
        let answered = matches!(e, ApiError::Refused { .. });
        // A process killed under the request takes a moment to be reaped.
        let died = if answered { None } else { self.exit_of(name) };
        let mut vms = locks::lock(&self.vms);
        let Some(entry) = vms.get_mut(name) else {
            return (status, message);
        };
        if let Some(how) = died {
            let why = format!(
                "its process died during the migration ({how}): {}",
                entry.log_tail()
            );
            tracing::warn!(name = %name, "VM failed: {why}");
            entry.phase = Phase::Failed(why.clone());
            return (410, format!("{name}: {why}"));
        }
        entry.phase = if status == 502 {
            Phase::Unresolved(message.clone())
        } else {
            Phase::Running
        };
        drop(vms);
        if status == 502 && self.cluster.is_some() {
            return self.settle_by_cluster(name, message);
        }
        (status, message)
    }

    /// A switchover whose outcome is unknown, settled by the cluster: `name` is fenced; if it
    /// is still this host's it runs here again (no commit can land any more), if another
    /// host owns it the stale copy here is discarded. The answer says which.
    fn settle_by_cluster(&self, name: &str, lost: String) -> (u16, String) {
        match self.fence(name) {
            Some(cluster::Fenced::Kept(o)) => match self.resume_fenced(name) {
                Ok(_) => (
                    500,
                    format!(
                        "{lost}; the cluster kept {name} on this host (generation {}): it \
                         runs here again and cannot run on the destination",
                        o.generation
                    ),
                ),
                Err((_, e)) => (
                    502,
                    format!("{lost}; it is still this host's, but resuming it failed: {e}"),
                ),
            },
            Some(cluster::Fenced::Moved(o)) => {
                let _ = self.discard(name);
                (
                    502,
                    format!(
                        "{lost}; the cluster says it moved to {} (generation {}): the copy \
                         here is discarded",
                        o.host, o.generation
                    ),
                )
            }
            Some(cluster::Fenced::NoKey) | None => (
                502,
                format!("{lost}; the cluster has no owner for {name}: left paused here"),
            ),
        }
    }

    /// How `name`'s process ended, if it does within [`PROCESS_GONE_WITHIN`] (the lock is not
    /// held meanwhile).
    fn exit_of(&self, name: &str) -> Option<String> {
        let t = Instant::now();
        loop {
            let how = locks::lock(&self.vms)
                .get_mut(name)
                .and_then(|e| e.proc.exited());
            if how.is_some() || t.elapsed() >= PROCESS_GONE_WITHIN {
                return how;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Passes a migration route on to `name`'s process.
    fn forward(&self, name: &str, method: &str, path: &str, body: &[u8]) -> Reply {
        let api = self.api_if(name, |p| !matches!(p, Phase::Failed(_)), "reach")?;
        let body: Option<Value> = if body.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            Some(serde_json::from_slice(body).map_err(|e| (400, format!("bad JSON body: {e}")))?)
        };
        vmm::api::Client::new(&api)
            .with_timeout(Duration::from_secs(30))
            .call::<Value>(method, path, body)
            .map_err(|e| passed_on(name, &e))
    }

    /// Resumes `name`, unresolved and just fenced: it is this host's.
    fn resume_fenced(&self, name: &str) -> Reply {
        let was = locks::lock(&self.vms)
            .get_mut(name)
            .map(|e| std::mem::replace(&mut e.phase, Phase::Running));
        let r = self.resume(name);
        if let (Err(_), Some(was)) = (&r, was) {
            if let Some(e) = locks::lock(&self.vms).get_mut(name) {
                e.phase = was;
            }
        }
        r
    }

    /// Resumes `name` (paused, or unresolved and proven not to run elsewhere: in a cluster,
    /// by fencing it).
    fn resume(&self, name: &str) -> Reply {
        let api = self.api_if(
            name,
            |p| matches!(p, Phase::Running | Phase::Unresolved(_)),
            "resume",
        )?;
        let unresolved = locks::lock(&self.vms)
            .get(name)
            .is_some_and(|e| matches!(e.phase, Phase::Unresolved(_)));
        if unresolved {
            let owner = match self.fence(name) {
                Some(cluster::Fenced::Moved(o)) => format!("host {} owns it", o.host),
                Some(cluster::Fenced::NoKey) => "the cluster has no owner for it".into(),
                Some(cluster::Fenced::Kept(_)) | None => String::new(),
            };
            if !owner.is_empty() {
                return Err((409, format!("{name} may not run here: {owner}")));
            }
        }
        let st = vmm::api::Client::new(&api)
            .resume()
            .map_err(|e| passed_on(name, &e))?;
        if let Some(e) = locks::lock(&self.vms).get_mut(name) {
            e.phase = Phase::Running;
        }
        Ok(json!(st))
    }

    /// Ends an unresolved VM whose destination runs it: the copy here is stale.
    pub(super) fn discard(&self, name: &str) -> Reply {
        let api = self.api_if(name, |p| matches!(p, Phase::Unresolved(_)), "discard")?;
        let _ = vmm::api::Client::new(&api)
            .with_timeout(Duration::from_secs(5))
            .shutdown();
        self.remove_when_gone(name);
        Ok(json!({ "discarded": name }))
    }

    fn probe(&self, r: &ProbeRequest) -> Reply {
        let window = Duration::from_millis(r.ms);
        let m =
            crate::probe::probe_paths(&r.paths, usize::from(r.streams), window, &self.cfg.security)
                .map_err(|e| match e {
                    crate::probe::ProbeError::Streams { .. } => (400, e.to_string()),
                    e => (502, e.to_string()),
                })?;
        Ok(json!(ProbeResult {
            bits_per_s: m.bits_per_s,
            sender_runnable: m.sender_runnable,
            receiver_runnable: m.receiver_runnable,
        }))
    }
}

fn describe(p: &Phase) -> String {
    match p {
        Phase::Migrating { to } => format!("migrating to {to}"),
        Phase::Unresolved(why) => format!("paused with its switchover unresolved ({why})"),
        Phase::Failed(why) => format!("failed ({why})"),
        p => p.name().to_string(),
    }
}

/// A VM as `host list` shows it; a VM whose process answers says its own state and heartbeat.
fn vm_info(rec: Record, phase: &Phase, api: PathBuf, pid: u32) -> VmInfo {
    let status = matches!(
        phase,
        Phase::Running | Phase::Migrating { .. } | Phase::Unresolved(_)
    )
    .then(|| {
        vmm::api::Client::new(&api)
            .with_timeout(Duration::from_secs(1))
            .status()
            .ok()
    })
    .flatten();
    let state = match (phase, &status) {
        (Phase::Running, Some(s)) => s.state.to_string(),
        (Phase::Running, None) => "unresponsive".into(),
        (p, _) => p.name().into(),
    };
    let error = match phase {
        Phase::Failed(why) | Phase::Unresolved(why) => Some(why.clone()),
        _ => None,
    };
    VmInfo {
        name: rec.name,
        memory: rec.memory,
        vcpus: rec.vcpus,
        state,
        heartbeat: status.as_ref().map_or(0, |s| s.heartbeat),
        origin: rec.origin,
        api,
        pid,
        error,
        disks: status
            .as_ref()
            .map_or_else(Vec::new, |s| device_paths(&s.devices)),
        nics: status.as_ref().map_or(0, |s| count_kind(&s.devices, "net")),
        disk_bytes: status
            .as_ref()
            .map_or(0, |s| allocated(&device_paths(&s.devices))),
        cpu_features: rec.cpu_features,
    }
}

/// Bytes the images have allocated (holes aside).
fn allocated(paths: &[PathBuf]) -> u64 {
    use std::os::unix::fs::MetadataExt;
    paths
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// The disk images among a VM's devices (as its status describes them).
fn device_paths(devices: &[serde_json::Value]) -> Vec<PathBuf> {
    devices
        .iter()
        .filter(|d| d["kind"] == "disk")
        .filter_map(|d| d["path"].as_str().map(PathBuf::from))
        .collect()
}

fn count_kind(devices: &[serde_json::Value], kind: &str) -> u32 {
    devices.iter().filter(|d| d["kind"] == kind).count() as u32
}
