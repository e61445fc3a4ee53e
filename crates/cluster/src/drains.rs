//! Drains handed to the drained host's agent: `drain --cluster --host a` run anywhere writes
//! an order under `drains/a`; a's agent runs the drain there (where its API socket is) and
//! writes back how it went. One order per host at a time.
use serde::{Deserialize, Serialize};

use crate::{ClusterError, Store};

/// Where a drain order stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DrainState {
    /// Written by the operator's command; the agent has not taken it yet.
    Requested,
    /// The agent runs it.
    Running,
    /// It ended; `report` says how.
    Done,
    /// It could not run, or its process failed; `summary` says why.
    Failed,
}

/// A drain of one host, as ordered and as it went.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrainOrder {
    pub id: u64,
    pub state: DrainState,
    /// `livemig drain` options for the agent to pass on (never the cluster's or the host's).
    pub args: Vec<String>,
    /// Set by the operator's Ctrl-C: the agent interrupts the drain, which stops as Ctrl-C
    /// stops it (every VM on exactly one host).
    #[serde(default)]
    pub cancel: bool,
    /// The drain's last line, or why it failed.
    #[serde(default)]
    pub summary: String,
    /// Whether it ended with every VM moved and verified (the drain's exit status).
    #[serde(default)]
    pub complete: bool,
    /// The drain's JSON report, once it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<serde_json::Value>,
}

fn key(host: &str) -> String {
    format!("drains/{host}")
}

impl Store {
    /// Orders a drain of `host`; false if one is under way already.
    pub fn order_drain(&self, host: &str, order: &DrainOrder) -> Result<bool, ClusterError> {
        let v = serde_json::to_string(order).unwrap_or_default();
        self.create(&key(host), &v)
    }

    /// The drain order of `host`, if any (one that does not parse is reported as failed).
    pub fn drain_order(&self, host: &str) -> Result<Option<DrainOrder>, ClusterError> {
        Ok(self.get(&key(host))?.map(|v| {
            serde_json::from_str(&v).unwrap_or_else(|e| DrainOrder {
                id: 0,
                state: DrainState::Failed,
                args: Vec::new(),
                cancel: false,
                complete: false,
                summary: format!("drains/{host} holds no drain order: {e}"),
                report: None,
            })
        }))
    }

    /// Writes `order` back if the stored one is still order `order.id` (an operator may have
    /// cleared it); whether it was.
    pub fn update_drain(
        &self,
        host: &str,
        old: &DrainOrder,
        new: &DrainOrder,
    ) -> Result<bool, ClusterError> {
        let (o, n) = (
            serde_json::to_string(old).unwrap_or_default(),
            serde_json::to_string(new).unwrap_or_default(),
        );
        self.swap(&key(host), &o, &n)
    }

    /// Removes `host`'s drain order.
    pub fn clear_drain(&self, host: &str) -> Result<(), ClusterError> {
        self.delete(&key(host))
    }
}
