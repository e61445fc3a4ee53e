//! Who owns each VM: one key per VM, `vms/NAME` = [`Owner`] (host, generation). Every change
//! is a compare-and-swap on the whole value, so of two hosts racing for a VM exactly one
//! wins:
//!
//! - `host run` creates the key only if it is absent (names are unique in the cluster);
//! - a migration's commit point moves it from the source to the destination, generation
//!   `g` → `g + 1`, if it still reads the source at `g`; the destination's vCPUs start only
//!   after that;
//! - a source that lost track of its switchover fences: it bumps its own generation if it
//!   still owns the VM (then the destination's commit can no longer land, and the source
//!   resumes), or finds the destination owns it (and discards its copy).
//!
//! An etcd request whose answer is lost may still have been applied: both sides read again
//! until etcd answers and act on what they read, never on a guess.
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{ClusterError, Store};

/// A VM's owner: the host that may run it, and how many times it changed hands.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Owner {
    pub host: String,
    pub generation: u64,
}

impl Owner {
    fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    fn next(&self, host: &str) -> Owner {
        Owner {
            host: host.to_string(),
            generation: self.generation + 1,
        }
    }
}

/// The key of VM `name`.
fn key(name: &str) -> String {
    format!("vms/{name}")
}

/// What a commit does next, given the owner it reads now.
#[derive(Debug, PartialEq, Eq)]
pub enum CommitStep {
    /// The VM is the destination's at `generation`: committed (perhaps by an earlier
    /// attempt whose answer was lost).
    Committed(Owner),
    /// The source still owns it: swap it over.
    Swap(Owner),
    /// It can never commit: why.
    Refused(String),
}

/// The commit's decision on reading `now`, for a migration of `vm` to `to` that began when
/// `start` owned it (its source, at the generation its agent read then).
pub fn commit_step(vm: &str, now: Option<&Owner>, start: &Owner, to: &str) -> CommitStep {
    let Some(now) = now else {
        return CommitStep::Refused(format!("the cluster has no owner for VM {vm}"));
    };
    if *now == start.next(to) {
        CommitStep::Committed(now.clone())
    } else if now == start {
        CommitStep::Swap(now.clone())
    } else if now.host == start.host {
        CommitStep::Refused(format!(
            "VM {vm} was fenced by its source {} (generation {}, the migration began at {})",
            start.host, now.generation, start.generation
        ))
    } else {
        CommitStep::Refused(format!(
            "VM {vm} is owned by {} (generation {}), not by the source {}",
            now.host, now.generation, start.host
        ))
    }
}

/// What a source learns when it fences a VM whose switchover it lost track of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fenced {
    /// It still owns the VM, now at this generation: no commit can land any more, and the
    /// VM may run here again.
    Kept(Owner),
    /// Another host owns it: the copy here is stale.
    Moved(Owner),
    /// The cluster has no key for it (removed by hand): nothing proves either way.
    NoKey,
}

impl Store {
    /// The owner of VM `name`, if the cluster has one.
    pub fn owner(&self, name: &str) -> Result<Option<Owner>, ClusterError> {
        let Some(v) = self.get(&key(name))? else {
            return Ok(None);
        };
        serde_json::from_str(&v)
            .map(Some)
            .map_err(|e| ClusterError::Request {
                what: "reading a VM's owner",
                why: format!("vms/{name} holds {v:?}: {e}"),
            })
    }

    /// Every VM's owner.
    pub fn owners(&self) -> Result<Vec<(String, Owner)>, ClusterError> {
        Ok(self
            .list("vms/")?
            .into_iter()
            .filter_map(|(k, v)| Some((k, serde_json::from_str(&v).ok()?)))
            .collect())
    }

    /// Makes `host` the owner of a new VM `name` (generation 1), unless another host owns
    /// it; the owner now, and whether this claim created the key.
    pub fn claim(&self, name: &str, host: &str) -> Result<(Owner, bool), ClusterError> {
        let fresh = Owner {
            host: host.into(),
            generation: 1,
        };
        if self.create(&key(name), &fresh.json())? {
            return Ok((fresh, true));
        }
        match self.owner(name)? {
            Some(o) if o.host == host => Ok((o, false)),
            Some(o) => Err(ClusterError::VmOwned {
                name: name.into(),
                host: o.host,
            }),
            // Released between the two requests: try once more.
            None if self.create(&key(name), &fresh.json())? => Ok((fresh, true)),
            None => Err(ClusterError::Request {
                what: "claiming a VM",
                why: format!("vms/{name} changed twice under the claim"),
            }),
        }
    }

    /// Gives up `host`'s ownership of `name` (the VM was stopped there); a key naming
    /// another owner stays.
    pub fn release(&self, name: &str, host: &str) -> Result<(), ClusterError> {
        if let Some(o) = self.owner(name)?.filter(|o| o.host == host) {
            self.delete_if(&key(name), &o.json())?;
        }
        Ok(())
    }

    /// The commit point of migrating `name` from `start` (its source and the generation the
    /// migration began at) to `to`: swaps the owner if it still reads `start`. A request whose
    /// answer is lost is read back until etcd answers (every `retry`), so the result is never
    /// a guess: the new owner, or why it can never commit. `waiting` is told each failed
    /// attempt.
    pub fn commit_move(
        &self,
        name: &str,
        (start, to): (&Owner, &str),
        retry: Duration,
        waiting: &dyn Fn(&ClusterError),
    ) -> Result<Owner, String> {
        // First as the migration began (one request in the guest's downtime); read back only
        // when that swap did not land.
        let mut known = Some(Some(start.clone()));
        loop {
            let now = match known.take() {
                Some(now) => now,
                None => match self.owner(name) {
                    Ok(now) => now,
                    Err(e) => {
                        waiting(&e);
                        std::thread::sleep(retry);
                        continue;
                    }
                },
            };
            let expect = match commit_step(name, now.as_ref(), start, to) {
                CommitStep::Committed(o) => return Ok(o),
                CommitStep::Refused(why) => return Err(why),
                CommitStep::Swap(o) => o,
            };
            let next = expect.next(to);
            match self.swap(&key(name), &expect.json(), &next.json()) {
                Ok(true) => return Ok(next),
                // Read again: the step names what changed.
                Ok(false) => {}
                Err(e) => {
                    waiting(&e);
                    std::thread::sleep(retry);
                }
            }
        }
    }

    /// Fences VM `name` for `host`, which lost track of its switchover: see [`Fenced`]. Reads
    /// and swaps until etcd answers (every `retry`); `waiting` is told each failed attempt.
    pub fn fence(
        &self,
        name: &str,
        host: &str,
        retry: Duration,
        waiting: &dyn Fn(&ClusterError),
    ) -> Fenced {
        loop {
            let now = match self.owner(name) {
                Ok(Some(o)) => o,
                Ok(None) => return Fenced::NoKey,
                Err(e) => {
                    waiting(&e);
                    std::thread::sleep(retry);
                    continue;
                }
            };
            if now.host != host {
                return Fenced::Moved(now);
            }
            let next = now.next(host);
            match self.swap(&key(name), &now.json(), &next.json()) {
                Ok(true) => return Fenced::Kept(next),
                Ok(false) => {}
                Err(e) => {
                    waiting(&e);
                    std::thread::sleep(retry);
                }
            }
        }
    }
}

/// How often a commit or a fence asks again while etcd does not answer.
pub const RETRY: Duration = Duration::from_millis(500);

/// A destination's side of the commit point: its client, connected ahead of the switchover
/// when etcd answers then (the commit is in the guest's downtime), and its name.
pub struct Arrival {
    endpoints: crate::Endpoints,
    host: String,
    store: std::sync::Mutex<Option<Store>>,
}

impl Arrival {
    pub fn new(endpoints: crate::Endpoints, host: String) -> Self {
        let store = Store::connect(&endpoints)
            .map_err(|e| tracing::warn!("cluster: {e}; connecting again at the commit"))
            .ok();
        Arrival {
            endpoints,
            host,
            store: std::sync::Mutex::new(store),
        }
    }

    /// Commits VM `name`'s move from `start` to this host (see [`Store::commit_move`]);
    /// returns when it knows whether it did.
    pub fn commit(&self, name: &str, start: &Owner) -> Result<Owner, String> {
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let s = loop {
            if let Some(s) = store.as_ref() {
                break s;
            }
            match Store::connect(&self.endpoints) {
                Ok(s) => *store = Some(s),
                Err(e) => {
                    tracing::warn!(vm = name, "commit waits for etcd: {e}");
                    std::thread::sleep(RETRY);
                }
            }
        };
        let waiting = |e: &ClusterError| tracing::warn!(vm = name, "commit waits for etcd: {e}");
        s.commit_move(name, (start, &self.host), RETRY, &waiting)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(host: &str, generation: u64) -> Owner {
        Owner {
            host: host.into(),
            generation,
        }
    }

    #[test]
    fn a_commit_swaps_from_the_source_and_takes_a_lost_answer_as_committed() {
        let start = at("a", 3);
        assert_eq!(
            commit_step("v", Some(&at("a", 3)), &start, "b"),
            CommitStep::Swap(at("a", 3))
        );
        // The swap's answer was lost; reading shows it landed.
        assert_eq!(
            commit_step("v", Some(&at("b", 4)), &start, "b"),
            CommitStep::Committed(at("b", 4))
        );
    }

    #[test]
    fn a_commit_is_refused_once_the_source_fenced_or_another_host_owns_the_vm() {
        let start = at("a", 3);
        let fenced = commit_step("v", Some(&at("a", 4)), &start, "b");
        assert!(
            matches!(&fenced, CommitStep::Refused(w) if w.contains("fenced by its source a")),
            "{fenced:?}"
        );
        let other = commit_step("v", Some(&at("c", 7)), &start, "b");
        assert!(
            matches!(&other, CommitStep::Refused(w) if w.contains("owned by c (generation 7), not by the source a")),
            "{other:?}"
        );
        // The destination owning it at another generation is not this move's commit.
        let stale = commit_step("v", Some(&at("b", 9)), &start, "b");
        assert!(matches!(stale, CommitStep::Refused(_)), "{stale:?}");
        assert!(matches!(
            commit_step("v", None, &start, "b"),
            CommitStep::Refused(_)
        ));
    }

    #[test]
    fn the_owner_is_stored_as_plain_json() {
        assert_eq!(at("a", 2).json(), r#"{"host":"a","generation":2}"#);
        assert_eq!(at("a", 2).next("b"), at("b", 3));
    }
}
