//! The cluster's shared state in etcd (Raft keeps it; this crate is its client): which hosts
//! are members and which of them are alive, what each holds, and the cluster-wide
//! live-migration settings every agent applies.
//!
//! | key under `/livemig/` | value | lifetime |
//! |---|---|---|
//! | `members/NAME` | JSON [`Member`] | permanent: a host the cluster knows |
//! | `hosts/NAME` | JSON [`HostRecord`] | under the host's lease: present while it is alive |
//! | `config/SETTING` | the [`Setting`]'s value | permanent |
//!
//! A member whose `hosts/` key is gone (its agent stopped, died or lost etcd for longer than
//! its lease) is `unreachable`.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

mod membership;
pub mod settings;
mod store;

pub use membership::{Membership, LEASE_TTL};
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<HostRecord>,
}

/// `livemig cluster status`: the members, their VMs, the settings.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterStatus {
    pub hosts: Vec<HostStatus>,
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

    /// Every member, live or not, with what the live ones say.
    pub fn status(&self) -> Result<ClusterStatus, ClusterError> {
        let members = self.list("members/")?;
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
        Ok(ClusterStatus {
            hosts,
            settings: settings.effective(),
            refused_settings: settings.refused,
        })
    }
}

impl ClusterStatus {
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
                        "live",
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
            "\n{:<16} {:<16} {:>10} {:<10} MIGRATION\n",
            "VM", "HOST", "MEM-MiB", "STATE"
        );
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
                    "{:<16} {:<16} {:>10} {:<10} {m}\n",
                    v.name,
                    h.name,
                    v.memory >> 20,
                    v.state
                );
            }
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
                    record: None,
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
            t.contains("sql1             a                      1024 running"),
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
}
