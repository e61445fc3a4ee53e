//! What a user asks a migration to do: one typed request, the same from the command line, the
//! VM's API, the demo and the bench, turned into [`MigrateOptions`] in one place.
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::protocol::Transport;
use crate::send::MigrateOptions;

/// `POST /vm/migrate`'s body. Absent fields take the defaults of [`MigrateOptions::new`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The destination's HOST:PORT.
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
    /// The pause the guest may see.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rounds: Option<u32>,
    /// Cap on what the migration sends, bits/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// Page streams to `to`, beside the control connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<u16>,
    /// One page stream per NIC pair: `LOCAL>REMOTE,...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Throttle the guest when rounds stop shrinking (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_converge: Option<bool>,
}

/// `10.0.1.1>10.0.1.2,10.0.2.1>10.0.2.2` into (local address, remote host) pairs.
pub fn parse_network(s: &str) -> Result<Vec<(std::net::IpAddr, String)>, String> {
    s.split(',')
        .map(|pair| {
            let (l, r) = pair
                .split_once('>')
                .ok_or_else(|| format!("{pair:?} is not LOCAL>REMOTE"))?;
            let local = l
                .trim()
                .parse()
                .map_err(|e| format!("local address {l:?}: {e}"))?;
            let remote = r.trim();
            if remote.is_empty() {
                return Err(format!("{pair:?} has no remote address"));
            }
            Ok((local, remote.to_string()))
        })
        .collect()
}

impl MigrateRequest {
    pub fn new(to: impl Into<String>) -> Self {
        MigrateRequest {
            to: to.into(),
            ..Default::default()
        }
    }

    /// The options the engine runs with; a bad `network` is the only thing that can fail.
    pub fn options(&self) -> Result<MigrateOptions, String> {
        let mut o = MigrateOptions::new(self.to.clone());
        if let Some(t) = self.transport {
            o.transport = t;
        }
        if let Some(d) = self.downtime_ms {
            o.policy.downtime_target = Duration::from_millis(d);
        }
        if let Some(r) = self.max_rounds {
            o.policy.max_rounds = r;
        }
        if self.auto_converge == Some(false) {
            o.policy.auto_converge = None;
        }
        o.max_bandwidth = self.max_bandwidth;
        o.channels = self.channels.unwrap_or(0);
        if let Some(n) = &self.network {
            o.network = parse_network(n)?;
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_round_trips_and_becomes_options() {
        let r = MigrateRequest {
            transport: Some(Transport::Direct),
            downtime_ms: Some(50),
            network: Some("10.0.1.1>10.0.1.2, 10.0.2.1>10.0.2.2".into()),
            auto_converge: Some(false),
            ..MigrateRequest::new("10.0.1.2:7000")
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"transport\":\"direct\""), "{json}");
        assert_eq!(serde_json::from_str::<MigrateRequest>(&json).unwrap(), r);
        let o = r.options().unwrap();
        assert_eq!(o.transport, Transport::Direct);
        assert_eq!(o.policy.downtime_target, Duration::from_millis(50));
        assert!(o.policy.auto_converge.is_none());
        assert_eq!(o.network.len(), 2);
        assert_eq!(o.network[1].1, "10.0.2.2");
    }

    #[test]
    fn bad_requests_are_refused() {
        assert!(
            serde_json::from_str::<MigrateRequest>(r#"{"to":"a:1","transport":"rdma"}"#).is_err()
        );
        assert!(serde_json::from_str::<MigrateRequest>(r#"{"to":"a:1","speed":1}"#).is_err());
        assert!(serde_json::from_str::<MigrateRequest>(r#"{"downtime_ms":1}"#).is_err());
        let r = MigrateRequest {
            network: Some("10.0.0.1-10.0.0.2".into()),
            ..MigrateRequest::new("a:1")
        };
        assert!(r.options().is_err());
    }
}
