//! The cluster's shared state in etcd (Raft keeps it; this crate is its client): which hosts
//! are members and which of them are alive, what each holds, and the cluster-wide
//! live-migration settings every agent applies.
//!
//! | key under `/livemig/` | value | lifetime |
//! |---|---|---|
//! | `members/NAME` | JSON [`Member`] | permanent: a host the cluster knows |
//! | `hosts/NAME` | JSON [`HostRecord`] | under the host's lease: present while it is alive |
//! | `config/SETTING` | the [`Setting`]'s value | permanent |
//! | `drains/NAME` | JSON [`DrainOrder`] | from `drain --cluster --host NAME` until it ends |
//! | `cordons/NAME` | JSON [`Cordon`] | from `cluster cordon` (or a drain) to `cluster uncordon` |
//! | `vms/NAME` | JSON [`Owner`]: host, generation | from `host run` until the VM is stopped |
//!
//! A member whose `hosts/` key is gone (its agent stopped, died or lost etcd for longer than
//! its lease) is `unreachable`.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub mod drains;
mod membership;
pub mod ownership;
pub mod settings;
mod store;

pub use drains::{DrainOrder, DrainState};
pub use membership::{Membership, LEASE_TTL};
pub use ownership::{Arrival, Fenced, Owner};
pub use settings::{Effective, Setting, Settings};
pub use store::{ClusterTls, Endpoints, Store};

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ClusterError {
    /// the cluster's endpoints: {0}
    Endpoints(String),
    /// reading the cluster credentials {path}: {why}
    Credentials { path: PathBuf, why: String },
    /// starting the etcd client's runtime: {0}
    Runtime(std::io::Error),
    /// etcd at {urls} is unreachable: {why}
    Unreachable { urls: String, why: String },
    /// etcd: {what}: {why}
    Request { what: &'static str, why: String },
    /// {0}
    Setting(String),
    /// host {name} is already a live member of the cluster (its lease is held elsewhere)
    NameTaken { name: String },
    /// VM {name} is owned by host {host} in the cluster
    VmOwned { name: String, host: String },
    /// starting the membership thread: {0}
    Thread(std::io::Error),
}

/// A host the cluster knows, since it first joined.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// Unix time of its first join, ms.
    pub joined_ms: u64,
}

/// What a live host says of itself, renewed while its lease lives.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostRecord {
    pub name: String,
    /// Where migrations come in, as it listens.
    pub listen: String,
    /// Its IPv4 addresses (other than loopback): where others reach it.
    pub addresses: Vec<String>,
    /// The bridge its VMs' NICs go on.
    pub bridge: Option<String>,
    /// Directories of disk images it reaches.
    pub storage: Vec<PathBuf>,
    pub memory_total: u64,
    /// What a VM arriving now may have.
    pub room: u64,
    pub vms: Vec<VmSummary>,
    pub inbound: usize,
    pub outbound: usize,
    /// Incoming migrations it takes at once.
    #[serde(default)]
    pub max_inbound: usize,
    /// Its agent's API socket, on that host: where a drain of it runs.
    #[serde(default)]
    pub api: PathBuf,
    /// The CPU features it offers guests (empty: unknown).
    #[serde(default)]
    pub cpu_features: Vec<String>,
    /// Its fastest NIC's speed, bits/s (0: unknown).
    #[serde(default)]
    pub nic_bits_per_s: u64,
}

impl HostRecord {
    /// The address sources reach it on: where it listens, or, when that is every address,
    /// its first IPv4 address with that port.
    /// The address sources reach it on within `nets` (its listening address, else its first
    /// address there, with the listening port); None if it has none there.
    pub fn address_in(&self, nets: &[(std::net::Ipv4Addr, u8)]) -> Option<String> {
        let listen: std::net::SocketAddr = self.listen.parse().ok()?;
        let inside = |ip: std::net::IpAddr| match ip {
            std::net::IpAddr::V4(v4) => settings::in_networks(v4, nets),
            std::net::IpAddr::V6(_) => false,
        };
        if !listen.ip().is_unspecified() {
            return inside(listen.ip()).then(|| self.listen.clone());
        }
        self.addresses
            .iter()
            .filter_map(|a| a.parse::<std::net::Ipv4Addr>().ok())
            .find(|ip| settings::in_networks(*ip, nets))
            .map(|ip| format!("{ip}:{}", listen.port()))
    }

    pub fn address(&self) -> Option<String> {
        let listen: std::net::SocketAddr = self.listen.parse().ok()?;
        if !listen.ip().is_unspecified() {
            return Some(self.listen.clone());
        }
        let ip = self.addresses.first()?;
        Some(format!("{ip}:{}", listen.port()))
    }
}

impl ClusterStatus {
    /// The CPU features every live host that says which it offers offers: what VMs started
    /// under `cpu-baseline cluster` see. None if no live host says.
    pub fn cpu_baseline(&self) -> Option<std::collections::BTreeSet<String>> {
        self.hosts
            .iter()
            .filter_map(|h| h.record.as_ref())
            .filter(|r| !r.cpu_features.is_empty())
            .map(|r| {
                r.cpu_features
                    .iter()
                    .cloned()
                    .collect::<std::collections::BTreeSet<_>>()
            })
            .reduce(|a, b| a.intersection(&b).cloned().collect())
    }
}

/// A host taken out of placement: nothing new goes there until it is uncordoned.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Cordon {
    /// Unix time, ms.
    pub since_ms: u64,
    /// Why (a drain, maintenance, an operator).
    pub why: String,
}

/// One VM as its host reports it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmSummary {
    pub name: String,
    pub memory: u64,
    /// starting, running, paused, incoming, migrating, failed
    pub state: String,
    /// Its migration out, while one is in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<InFlight>,
}

/// A migration in flight, as its source last saw it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InFlight {
    pub to: String,
    /// prepare, copy, sync, switchover, postcopy, postcopy-paused, verify
    pub phase: String,
    pub bytes_on_wire: u64,
    pub ram_bytes: u64,
}

/// A member's liveness.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    /// Its lease lives: it may take VMs.
    Live,
    /// Its lease lapsed: nothing is placed on it.
    Unreachable,
}

/// One member, and what it last said if it is live.
#[derive(Clone, Debug, Serialize)]
pub struct HostStatus {
    pub name: String,
    pub state: Liveness,
    /// Taken out of placement, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cordoned: Option<Cordon>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<HostRecord>,
}

/// A VM and its owner.
#[derive(Clone, Debug, Serialize)]
pub struct OwnedVm {
    pub name: String,
    pub owner: String,
    pub generation: u64,
}

/// `livemig cluster status`: the members, their VMs, the settings.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterStatus {
    pub hosts: Vec<HostStatus>,
    /// Every VM's owner, as the cluster holds it.
    pub owners: Vec<OwnedVm>,
    pub settings: Vec<Effective>,
    /// Settings in the store that do not check, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refused_settings: Vec<(String, String)>,
}

impl Store {
    /// The cluster's settings as stored (checked).
    pub fn settings(&self) -> Result<Settings, ClusterError> {
        let pairs = self.list("config/")?;
        Ok(Settings::from_pairs(
            pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        ))
    }

    /// Sets `setting` for the whole cluster; its canonical value.
    pub fn set(&self, setting: Setting, value: &str) -> Result<String, ClusterError> {
        let v = setting.check(value).map_err(ClusterError::Setting)?;
        self.put(&format!("config/{}", setting.name()), &v, None)?;
        Ok(v)
    }

    /// Takes `setting` back to its default.
    pub fn unset(&self, setting: Setting) -> Result<(), ClusterError> {
        self.delete(&format!("config/{}", setting.name()))
    }

    /// Takes host `name` out of placement.
    pub fn cordon(&self, name: &str, why: &str) -> Result<(), ClusterError> {
        let c = Cordon {
            since_ms: now_ms(),
            why: why.into(),
        };
        let v = serde_json::to_string(&c).unwrap_or_default();
        self.put(&format!("cordons/{name}"), &v, None)
    }

    /// Puts host `name` back into placement.
    pub fn uncordon(&self, name: &str) -> Result<(), ClusterError> {
        self.delete(&format!("cordons/{name}"))
    }

    /// Whether host `name` is cordoned.
    pub fn cordoned(&self, name: &str) -> Result<Option<Cordon>, ClusterError> {
        Ok(self
            .get(&format!("cordons/{name}"))?
            .and_then(|v| serde_json::from_str(&v).ok()))
    }

    /// Every member, live or not, with what the live ones say.
    pub fn status(&self) -> Result<ClusterStatus, ClusterError> {
        let members = self.list("members/")?;
        let cordons: std::collections::BTreeMap<String, Cordon> = self
            .list("cordons/")?
            .into_iter()
            .filter_map(|(k, v)| Some((k, serde_json::from_str(&v).ok()?)))
            .collect();
        let live: std::collections::BTreeMap<String, HostRecord> = self
            .list("hosts/")?
            .into_iter()
            .filter_map(|(k, v)| Some((k, serde_json::from_str(&v).ok()?)))
            .collect();
        let hosts = members
            .into_iter()
            .map(|(name, _)| {
                let record = live.get(&name).cloned();
                HostStatus {
                    cordoned: cordons.get(&name).cloned(),
                    state: if record.is_some() {
                        Liveness::Live
                    } else {
                        Liveness::Unreachable
                    },
                    name,
                    record,
                }
            })
            .collect();
        let settings = self.settings()?;
        let owners = self
            .owners()?
            .into_iter()
            .map(|(name, o)| OwnedVm {
                name,
                owner: o.host,
                generation: o.generation,
            })
            .collect();
        Ok(ClusterStatus {
            hosts,
            owners,
            settings: settings.effective(),
            refused_settings: settings.refused,
        })
    }
}

/// Unix time now, ms.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl ClusterStatus {
    /// Where a drain of `host` may send its VMs: every other live member that is not
    /// cordoned and that sources can reach.
    pub fn drain_targets(&self, host: &str) -> Vec<&HostRecord> {
        self.hosts
            .iter()
            .filter(|h| h.name != host && h.cordoned.is_none())
            .filter_map(|h| h.record.as_ref())
            .filter(|r| r.address().is_some())
            .collect()
    }

    /// The status as a table: hosts, then their VMs, then the settings.
    pub fn render(&self) -> String {
        let mut s = format!(
            "{:<16} {:<12} {:<22} {:>10} {:>4} {:>4} {:>4}\n",
            "HOST", "STATE", "LISTEN", "ROOM-MiB", "VMS", "IN", "OUT"
        );
        for h in &self.hosts {
            match &h.record {
                Some(r) => {
                    s += &format!(
                        "{:<16} {:<12} {:<22} {:>10} {:>4} {:>4} {:>4}\n",
                        h.name,
                        if h.cordoned.is_some() {
                            "cordoned"
                        } else {
                            "live"
                        },
                        r.listen,
                        r.room >> 20,
                        r.vms.len(),
                        r.inbound,
                        r.outbound
                    )
                }
                None => s += &format!("{:<16} {:<12}\n", h.name, "unreachable"),
            }
        }
        s += &format!(
            "\n{:<16} {:<16} {:<16} {:>10} {:<10} MIGRATION\n",
            "VM", "HOST", "OWNER", "MEM-MiB", "STATE"
        );
        let owner = |vm: &str| {
            self.owners
                .iter()
                .find(|o| o.name == vm)
                .map_or("-".to_string(), |o| format!("{}/{}", o.owner, o.generation))
        };
        for h in &self.hosts {
            for v in h.record.iter().flat_map(|r| &r.vms) {
                let m = v.migration.as_ref().map_or(String::new(), |m| {
                    format!(
                        "to {}: {}, {} of {} MiB sent",
                        m.to,
                        m.phase,
                        m.bytes_on_wire >> 20,
                        m.ram_bytes >> 20
                    )
                });
                s += &format!(
                    "{:<16} {:<16} {:<16} {:>10} {:<10} {m}\n",
                    v.name,
                    h.name,
                    owner(&v.name),
                    v.memory >> 20,
                    v.state
                );
            }
        }
        // Owned VMs no live host lists: their owner is unreachable (or they were lost).
        let listed = |vm: &str| {
            self.hosts
                .iter()
                .flat_map(|h| h.record.iter().flat_map(|r| &r.vms))
                .any(|v| v.name == vm)
        };
        for o in self.owners.iter().filter(|o| !listed(&o.name)) {
            s += &format!(
                "{:<16} {:<16} {:<16} {:>10} {:<10}\n",
                o.name,
                "-",
                format!("{}/{}", o.owner, o.generation),
                "-",
                "unseen"
            );
        }
        s += "\nSETTING                  VALUE                      SOURCE\n";
        for e in &self.settings {
            s += &format!("{:<24} {:<26} {}\n", e.setting, e.value, e.source);
        }
        for (k, why) in &self.refused_settings {
            s += &format!("(ignored: {k}: {why})\n");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_live_and_unreachable_hosts_and_their_vms() {
        let st = ClusterStatus {
            hosts: vec![
                HostStatus {
                    name: "a".into(),
                    state: Liveness::Live,
                    cordoned: None,
                    record: Some(HostRecord {
                        name: "a".into(),
                        listen: "0.0.0.0:7000".into(),
                        room: 2 << 30,
                        vms: vec![
                            VmSummary {
                                name: "sql1".into(),
                                memory: 1 << 30,
                                state: "running".into(),
                                migration: None,
                            },
                            VmSummary {
                                name: "web2".into(),
                                memory: 512 << 20,
                                state: "migrating".into(),
                                migration: Some(InFlight {
                                    to: "10.0.0.2:7000".into(),
                                    phase: "copy".into(),
                                    bytes_on_wire: 100 << 20,
                                    ram_bytes: 512 << 20,
                                }),
                            },
                        ],
                        ..Default::default()
                    }),
                },
                HostStatus {
                    name: "b".into(),
                    state: Liveness::Unreachable,
                    cordoned: None,
                    record: None,
                },
            ],
            owners: vec![
                OwnedVm {
                    name: "sql1".into(),
                    owner: "a".into(),
                    generation: 3,
                },
                OwnedVm {
                    name: "lost9".into(),
                    owner: "b".into(),
                    generation: 1,
                },
            ],
            settings: Settings::default().effective(),
            refused_settings: Vec::new(),
        };
        let t = st.render();
        assert!(
            t.contains("a                live         0.0.0.0:7000"),
            "{t}"
        );
        assert!(t.contains("b                unreachable"), "{t}");
        assert!(
            t.contains("sql1             a                a/3                    1024 running"),
            "{t}"
        );
        assert!(
            t.contains("lost9            -                b/1                       - unseen"),
            "{t}"
        );
        assert!(
            t.contains("migrating  to 10.0.0.2:7000: copy, 100 of 512 MiB sent"),
            "{t}"
        );
        assert!(
            t.contains("transport                tcp                        default"),
            "{t}"
        );
    }

    fn live(name: &str, listen: &str, cordoned: bool) -> HostStatus {
        HostStatus {
            name: name.into(),
            state: Liveness::Live,
            cordoned: cordoned.then(|| Cordon {
                since_ms: 1,
                why: "maintenance".into(),
            }),
            record: Some(HostRecord {
                name: name.into(),
                listen: listen.into(),
                addresses: vec!["10.0.0.9".into()],
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_drain_goes_to_the_other_live_hosts_that_are_not_cordoned() {
        let st = ClusterStatus {
            hosts: vec![
                live("a", "10.0.0.1:7000", false),
                live("b", "0.0.0.0:7000", false),
                live("c", "10.0.0.3:7000", true),
                HostStatus {
                    name: "d".into(),
                    state: Liveness::Unreachable,
                    cordoned: None,
                    record: None,
                },
                live("e", "not an address", false),
            ],
            owners: Vec::new(),
            settings: Vec::new(),
            refused_settings: Vec::new(),
        };
        let t: Vec<&str> = st
            .drain_targets("a")
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(t, ["b"]);
        // Listening on every address: reached on its first one.
        assert_eq!(
            st.drain_targets("a")[0].address().as_deref(),
            Some("10.0.0.9:7000")
        );
    }
}
