//! The agent in a cluster (`host serve --cluster`): its record in etcd under a lease it keeps
//! alive (what it holds and can take), and the cluster's live-migration settings, which its
//! migrations take where their request says nothing.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::{HostRecord, InFlight, Settings, VmSummary};

use super::Agent;

/// How long the cluster's settings are taken as read.
const SETTINGS_FRESH: Duration = Duration::from_secs(1);

/// The agent's cluster: a client for its settings, and the settings last read.
pub(super) struct InCluster {
    pub(super) store: cluster::Store,
    /// The settings and whether this host is cordoned, as last read.
    read: Mutex<Option<(Instant, Settings, bool)>>,
}

impl InCluster {
    pub fn connect(e: &cluster::Endpoints) -> Result<Self, cluster::ClusterError> {
        Ok(InCluster {
            store: cluster::Store::connect(e)?,
            read: Mutex::new(None),
        })
    }

    /// The cluster's settings and whether host `me` is cordoned, read at most once a
    /// second; None while etcd does not answer (the host's own defaults apply, and the log
    /// says why).
    fn read(&self, me: &str) -> Option<(Settings, bool)> {
        let mut read = locks::lock(&self.read);
        if let Some((at, s, c)) = read.as_ref() {
            if at.elapsed() < SETTINGS_FRESH {
                return Some((s.clone(), *c));
            }
        }
        let now = self
            .store
            .settings()
            .and_then(|s| Ok((s, self.store.cordoned(me)?.is_some())));
        match now {
            Ok((s, c)) => {
                *read = Some((Instant::now(), s.clone(), c));
                Some((s, c))
            }
            Err(e) => {
                tracing::warn!("cluster settings unknown, the host's own apply: {e}");
                None
            }
        }
    }
}

impl Agent {
    /// Joins the cluster, if the agent is configured for one.
    pub(super) fn join(
        self: &Arc<Self>,
    ) -> Result<Option<cluster::Membership>, cluster::ClusterError> {
        let Some(e) = &self.cfg.cluster else {
            return Ok(None);
        };
        let me = self.clone();
        cluster::Membership::join(e, cluster::LEASE_TTL, Box::new(move || me.record())).map(Some)
    }

    /// What this host says of itself to the cluster.
    pub(super) fn record(&self) -> HostRecord {
        let (cap, leaving) = {
            let vms = locks::lock(&self.vms);
            let leaving: HashMap<String, String> = vms
                .iter()
                .filter_map(|(n, e)| match &e.phase {
                    super::Phase::Migrating { to } => Some((n.clone(), to.clone())),
                    _ => None,
                })
                .collect();
            (self.capacity_of(&vms), leaving)
        };
        HostRecord {
            name: self.cfg.name.clone(),
            listen: cap.listen,
            addresses: ipv4_addresses(),
            bridge: cap.bridge,
            storage: self.cfg.storage.clone(),
            memory_total: cap.memory_total,
            room: cap.room,
            vms: self
                .list()
                .into_iter()
                .map(|v| VmSummary {
                    migration: leaving.get(&v.name).and_then(|to| in_flight(&v.api, to)),
                    name: v.name,
                    memory: v.memory,
                    state: v.state,
                })
                .collect(),
            inbound: cap.inbound,
            outbound: cap.outbound,
            max_inbound: cap.max_inbound,
            api: self.api_path(),
            cpu_features: cap.cpu_features.unwrap_or_default(),
            nic_bits_per_s: nic_bits_per_s(),
        }
    }

    /// The CPU features a VM started here now is kept from seeing: the host's mask, and,
    /// under `cpu-baseline cluster`, what some live host of the cluster does not offer.
    /// Without an answer from etcd under that setting, nothing starts (503): a VM that sees
    /// too much could not leave.
    pub(super) fn run_mask(&self) -> Result<Vec<String>, (u16, String)> {
        let mut mask = self.cfg.cpu_mask.clone();
        let (Some(c), Some(mine)) = (&self.cluster, &self.cpu_features) else {
            return Ok(mask);
        };
        let baseline = self
            .cluster_settings()
            .ok_or((
                503,
                "the cluster's cpu-baseline is unknown: etcd does not answer".to_string(),
            ))?
            .cpu_baseline;
        if baseline.as_deref() != Some("cluster") {
            return Ok(mask);
        }
        let common = c
            .store
            .status()
            .map_err(|e| (503, format!("the cluster's CPU baseline is unknown: {e}")))?
            .cpu_baseline()
            .unwrap_or_else(|| mine.clone());
        mask.extend(mine.difference(&common).cloned());
        mask.sort();
        mask.dedup();
        Ok(mask)
    }

    /// Makes this host the owner of new VM `name` in the cluster (if in one): whether the
    /// claim created its key (to be released if the VM does not start). A VM another host owns
    /// is refused (409); without an answer from etcd nothing starts (503).
    pub(super) fn claim(&self, name: &str) -> Result<bool, (u16, String)> {
        let Some(c) = &self.cluster else {
            return Ok(false);
        };
        match c.store.claim(name, &self.cfg.name) {
            Ok((_, created)) => Ok(created),
            Err(e @ cluster::ClusterError::VmOwned { .. }) => Err((409, e.to_string())),
            Err(e) => Err((
                503,
                format!("{name} cannot start: its name is not known to be unique ({e})"),
            )),
        }
    }

    /// Gives up this host's ownership of `name` (stopped here), best effort: a key left behind
    /// names this host, which may claim it again.
    pub(super) fn release(&self, name: &str) {
        if let Some(c) = &self.cluster {
            if let Err(e) = c.store.release(name, &self.cfg.name) {
                tracing::warn!(vm = name, "cluster: releasing its ownership: {e}");
            }
        }
    }

    /// Whether this host owns `name` and may migrate it: the generation its migration starts
    /// from (outside a cluster: None).
    pub(super) fn owns(&self, name: &str) -> Result<Option<u64>, (u16, String)> {
        let Some(c) = &self.cluster else {
            return Ok(None);
        };
        match c.store.owner(name) {
            Ok(Some(o)) if o.host == self.cfg.name => Ok(Some(o.generation)),
            Ok(Some(o)) => Err((
                409,
                format!(
                    "{name} is owned by host {} in the cluster, not by this host",
                    o.host
                ),
            )),
            Ok(None) => Err((409, format!("the cluster has no owner for {name}"))),
            Err(e) => Err((503, format!("{name}'s owner is unknown: {e}"))),
        }
    }

    /// Settles a switchover whose outcome this host lost, through the cluster: fences `name`
    /// (asking until etcd answers). None outside a cluster.
    pub(super) fn fence(&self, name: &str) -> Option<cluster::Fenced> {
        let c = self.cluster.as_ref()?;
        let waiting = |e: &cluster::ClusterError| {
            tracing::warn!(vm = name, "fencing waits for etcd: {e}");
        };
        Some(
            c.store
                .fence(name, &self.cfg.name, cluster::ownership::RETRY, &waiting),
        )
    }

    /// After adoption, in a cluster: a VM found here that another host owns is a copy whose
    /// migration committed while no agent was here to see it. Its process is gone (it left
    /// once it heard the Confirm) and its entry is forgotten, or it is paused (it lost the
    /// answer) and is discarded. A VM the cluster does not know yet is claimed. Running copies
    /// owned elsewhere are left alone and logged: only an operator can say which one is right.
    pub(super) fn reconcile(&self) {
        let Some(c) = &self.cluster else {
            return;
        };
        self.forget_moved();
        let found: Vec<(String, std::path::PathBuf)> = locks::lock(&self.vms)
            .iter()
            .filter(|(_, e)| e.phase == super::Phase::Running)
            .map(|(n, e)| (n.clone(), e.api()))
            .collect();
        for (name, api) in found {
            match c.store.claim(&name, &self.cfg.name) {
                Ok(_) => {}
                Err(cluster::ClusterError::VmOwned { host, .. }) => {
                    let paused = vmm::api::Client::new(&api)
                        .with_timeout(Duration::from_secs(2))
                        .status()
                        .is_ok_and(|s| s.state == migratable::RunState::Paused);
                    if paused {
                        tracing::warn!(vm = %name, owner = %host, "a stale paused copy: discarded");
                        if let Some(e) = locks::lock(&self.vms).get_mut(&name) {
                            e.phase = super::Phase::Unresolved(format!("host {host} owns it"));
                        }
                        let _ = self.discard(&name);
                    } else {
                        tracing::error!(vm = %name, owner = %host, "runs here but the cluster names another owner");
                    }
                }
                Err(e) => tracing::warn!(vm = %name, "cluster: checking its owner: {e}"),
            }
        }
    }

    /// Forgets the VMs listed failed here whose process ended because they moved: the
    /// cluster names another owner (their migration went on while no agent watched).
    pub(super) fn forget_moved(&self) {
        let Some(c) = &self.cluster else {
            return;
        };
        let failed: Vec<String> = locks::lock(&self.vms)
            .iter()
            .filter(|(_, e)| matches!(e.phase, super::Phase::Failed(_)))
            .map(|(n, _)| n.clone())
            .collect();
        for name in failed {
            match c.store.owner(&name) {
                Ok(Some(o)) if o.host != self.cfg.name => {
                    tracing::info!(vm = %name, owner = %o.host, "moved while no agent watched");
                    let mut vms = locks::lock(&self.vms);
                    if vms
                        .get(&name)
                        .is_some_and(|e| matches!(e.phase, super::Phase::Failed(_)))
                    {
                        if let Some(e) = vms.remove(&name) {
                            self.forget(e, crate::api::IncomingFate::Confirmed);
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(vm = %name, "cluster: checking its owner: {e}"),
            }
        }
    }

    /// What a receiver started here is told to commit in the cluster.
    pub(super) fn commit_args(&self) -> Vec<String> {
        let Some(e) = &self.cfg.cluster else {
            return Vec::new();
        };
        let mut a = e.args();
        a.extend(["--cluster-host".to_string(), self.cfg.name.clone()]);
        a
    }

    /// The cluster's settings, when in one that answers.
    pub(super) fn cluster_settings(&self) -> Option<Settings> {
        let c = self.cluster.as_ref()?;
        c.read(&self.cfg.name).map(|(s, _)| s)
    }

    /// Whether the cluster took this host out of placement (as last read).
    pub(super) fn cordoned(&self) -> bool {
        self.cluster
            .as_ref()
            .and_then(|c| c.read(&self.cfg.name))
            .is_some_and(|(_, c)| c)
    }

    /// Migrations this host takes in at once: the cluster's setting, else its own.
    pub(super) fn max_inbound(&self) -> usize {
        self.cluster_settings()
            .and_then(|s| s.max_concurrent_per_host)
            .unwrap_or(self.cfg.max_inbound)
    }
}

/// The migration out of the VM whose API is `api`, as it stands.
fn in_flight(api: &std::path::Path, to: &str) -> Option<InFlight> {
    let p = vmm::api::Client::new(api)
        .with_timeout(Duration::from_secs(1))
        .call::<Option<migration::Progress>>("GET", "/vm/migration", None)
        .ok()
        .flatten()?;
    Some(InFlight {
        to: to.to_string(),
        phase: p.phase,
        bytes_on_wire: p.bytes_on_wire,
        ram_bytes: p.ram_bytes,
    })
}

/// Fills what `req` leaves unsaid with the cluster's settings.
pub(super) fn apply(s: &Settings, req: &mut migration::MigrateRequest) {
    if req.transport.is_none() {
        req.transport = s.transport.as_deref().and_then(|t| t.parse().ok());
    }
    if req.channels.is_none() {
        req.channels = s.channels;
    }
    if req.max_bandwidth.is_none() {
        req.max_bandwidth = s.max_bandwidth;
    }
}

/// The speed of this host's fastest NIC, bits/s, as the kernel reports it (0: unknown).
fn nic_bits_per_s() -> u64 {
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return 0;
    };
    dir.flatten()
        .filter(|d| d.file_name() != "lo")
        .filter_map(|d| std::fs::read_to_string(d.path().join("speed")).ok())
        .filter_map(|s| s.trim().parse::<u64>().ok())
        .max()
        .map_or(0, |mbit| mbit.saturating_mul(1_000_000))
}

/// This host's IPv4 addresses, loopback aside.
fn ipv4_addresses() -> Vec<String> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list it allocated into `head`, which we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut at = head;
    while !at.is_null() {
        // SAFETY: `at` is a node of the list getifaddrs gave, not freed yet.
        let ifa = unsafe { &*at };
        // SAFETY: when not null, ifa_addr points at a sockaddr that lives as long as the list.
        if let Some(sa) = unsafe { ifa.ifa_addr.as_ref() } {
            if i32::from(sa.sa_family) == libc::AF_INET {
                // An AF_INET sockaddr: the port, then the address, in its data.
                let b = |i: usize| u8::from_ne_bytes(sa.sa_data[i].to_ne_bytes());
                let ip = std::net::Ipv4Addr::new(b(2), b(3), b(4), b(5));
                if !ip.is_loopback() {
                    out.push(ip.to_string());
                }
            }
        }
        at = ifa.ifa_next;
    }
    // SAFETY: `head` is the list getifaddrs allocated, freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_addresses_are_ipv4_and_not_loopback() {
        for a in ipv4_addresses() {
            let ip: std::net::Ipv4Addr = a.parse().unwrap();
            assert!(!ip.is_loopback() && !ip.is_unspecified(), "{a}");
        }
    }

    #[test]
    fn the_cluster_fills_only_what_the_request_leaves_unsaid() {
        let s = Settings::from_pairs([("transport", "compressed"), ("max-bandwidth", "500Mbit")]);
        let mut req = migration::MigrateRequest {
            to: "b:7000".into(),
            channels: Some(2),
            ..Default::default()
        };
        apply(&s, &mut req);
        assert_eq!(
            req.transport,
            Some(migration::protocol::Transport::Compressed)
        );
        assert_eq!(req.max_bandwidth, Some(500_000_000));
        assert_eq!(req.channels, Some(2), "the request's own word stands");
        let mut direct = migration::MigrateRequest {
            transport: Some(migration::protocol::Transport::Direct),
            ..Default::default()
        };
        apply(&s, &mut direct);
        assert_eq!(
            direct.transport,
            Some(migration::protocol::Transport::Direct)
        );
    }
}
