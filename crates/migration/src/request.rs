//! What a user asks a migration to do: one typed request, the same from the command line, the
//! VM's API, the demo and the bench, turned into [`MigrateOptions`] in one place.
use std::time::Duration;

use serde::{Deserialize, Serialize};

use transport::Security;

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
    /// Send re-sent pages as deltas against what the destination holds (default true; tcp and
    /// compressed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<bool>,
    /// Bytes of last-sent pages the source keeps for deltas (default: twice the hot set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_cache: Option<u64>,
    /// Send a page the destination already holds elsewhere as a reference (default true; tcp
    /// and compressed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup: Option<bool>,
    /// The destination host's page cache for this drain (the id its agent gave), used with
    /// dedup: pages it holds go as references, and pages of this copy are added to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_cache: Option<u64>,
    /// The guest's vCPUs yield the CPU to the migration's own threads until the pause
    /// (default true): nothing changes on a host with idle cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_yield: Option<bool>,
    /// Where the VM's disks are (default shared); `copy` moves them with the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<crate::Storage>,
    /// With `storage: copy`, remove the source's images once the VM runs on the copies.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub remove_source: bool,
    /// How copied disks keep up with the guest's writes: `rounds` or `mirror`
    /// (write-blocking); absent: chosen from the guest's write rate and the link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_sync: Option<migratable::DiskSync>,
    /// Post-copy: `"off"`, `"auto"` (the default: when pre-copy would not converge, the VM
    /// moves by post-copy instead of being throttled) or `{"after": N}` (after N passes over
    /// RAM; 0: at once). A host lost during post-copy loses the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<crate::policy::PostcopyMode>,
    /// The deadline on progress, in milliseconds (default 5000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_timeout_ms: Option<u64>,
    /// This host's credentials for mutual TLS; absent: the VM process's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<transport::tls::TlsFiles>,
    /// Plain TCP, no TLS (say so explicitly).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// A client holding this migration renews it at least this often (milliseconds) by asking
    /// for its progress; if it stops, the migration is cancelled (the client died).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// The VM's name, and the host it leaves, for the destination's agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// The VM's generation in the cluster as the migration starts (its origin's agent reads
    /// it): the destination's commit moves ownership only from this generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// The migration's session id; given by a drain, which asks the destination about it if
    /// the switchover's outcome is unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<u64>,
    /// How a compressed migration's batches go from the first: `raw` holds them raw (a drain
    /// whose model says the cores, not the link, would hold it back compressed), `auto` (the
    /// default) lets its codec policy choose. `PATCH /vm/migration` changes it later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codec: Option<crate::api::CodecMode>,
}

/// Why a request cannot become a migration.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum RequestError {
    /// {0:?} is not LOCAL>REMOTE
    NotAPair(String),
    /// local address {addr:?}: {source}
    LocalAddress {
        addr: String,
        source: std::net::AddrParseError,
    },
    /// {0:?} has no remote address
    NoRemote(String),
    /// a peer timeout of {0} ms is too short (100 ms at least)
    PeerTimeout(u64),
    /// a delta cache of {mib} MiB is more than the {max_mib} MiB allowed
    DeltaCache { mib: u64, max_mib: u64 },
    /// a bandwidth cap of {cap_mbit:.2} Mbit/s is below the minimum {min_mbit:.2} Mbit/s: a 1 MiB batch must cross within half the {timeout_s} s peer timeout
    BelowMinimum {
        cap_mbit: f64,
        min_mbit: f64,
        timeout_s: f64,
    },
    /// the TLS credentials: {0}
    Tls(#[from] transport::tls::TlsError),
    /// no TLS credentials: give --tls-cert, --tls-key and --tls-ca (create them with `livemig tls init`), or --insecure to run plaintext
    NoCredentials,
}

/// `10.0.1.1>10.0.1.2,10.0.2.1>10.0.2.2` into (local address, remote host) pairs.
pub fn parse_network(s: &str) -> Result<Vec<(std::net::IpAddr, String)>, RequestError> {
    s.split(',')
        .map(|pair| {
            let (l, r) = pair
                .split_once('>')
                .ok_or_else(|| RequestError::NotAPair(pair.to_string()))?;
            let local = l
                .trim()
                .parse()
                .map_err(|source| RequestError::LocalAddress {
                    addr: l.to_string(),
                    source,
                })?;
            let remote = r.trim();
            if remote.is_empty() {
                return Err(RequestError::NoRemote(pair.to_string()));
            }
            Ok((local, remote.to_string()))
        })
        .collect()
}

/// The largest `--delta-cache` a request may ask for.
pub const MAX_DELTA_CACHE: u64 = 64 << 30;

/// What a migration or receiver says when it has no credentials and was not told to run
/// plaintext.
pub const NO_CREDENTIALS: &str = "no TLS credentials: give --tls-cert, --tls-key and --tls-ca (create them with `livemig tls init`), or --insecure to run plaintext";

/// A bandwidth cap (`--max-bandwidth`, or a new pace for a migration under way) is refused
/// below [`min_bandwidth`]: a paced sender must never look dead to its peer's deadline.
pub fn check_bandwidth(cap: u64, peer_timeout: Duration) -> Result<(), RequestError> {
    let min = min_bandwidth(peer_timeout);
    if cap < min {
        return Err(RequestError::BelowMinimum {
            cap_mbit: cap as f64 / 1e6,
            min_mbit: min as f64 / 1e6,
            timeout_s: peer_timeout.as_secs_f64(),
        });
    }
    Ok(())
}

/// The least `--max-bandwidth` the protocol's deadlines allow: a full batch frame (1 MiB and
/// its head) must cross within half the peer timeout, or a paced sender would look dead.
pub fn min_bandwidth(peer_timeout: Duration) -> u64 {
    let frame_bits = (crate::protocol::Kind::Pages.max_len() as f64) * 8.0;
    let secs = (peer_timeout.as_secs_f64() / 2.0).max(0.001);
    // Positive and finite; `as` saturates.
    #[allow(clippy::cast_sign_loss)]
    let min = (frame_bits / secs).ceil() as u64;
    min
}

/// Whether a migration sends re-sent pages as deltas: asked for (`delta`), and not on the
/// direct transport, whose pages go from guest RAM to the socket untouched.
pub fn sends_deltas(delta: bool, transport: Transport) -> bool {
    delta && transport != Transport::Direct
}

impl MigrateRequest {
    /// Whether this request's migration sends re-sent pages as deltas.
    pub fn sends_deltas(&self) -> bool {
        sends_deltas(
            self.delta != Some(false),
            self.transport.unwrap_or(Transport::Tcp),
        )
    }

    pub fn new(to: impl Into<String>) -> Self {
        MigrateRequest {
            to: to.into(),
            ..Default::default()
        }
    }

    /// How the migration's connections are protected: plaintext only if asked for; the
    /// request's credentials, else `default` (the VM process's own), else none and an error.
    pub fn security(&self, default: Option<&Security>) -> Result<Security, RequestError> {
        if self.insecure {
            return Ok(Security::Insecure);
        }
        match (&self.tls, default) {
            (Some(files), _) => Ok(Security::Tls(std::sync::Arc::new(
                transport::tls::Tls::load(files)?,
            ))),
            (None, Some(s)) => Ok(s.clone()),
            (None, None) => Err(RequestError::NoCredentials),
        }
    }

    /// The options the engine runs with (security aside: see [`Self::security`]); a bad
    /// `network` or a cap below what the peer timeout allows fail here.
    pub fn options(&self) -> Result<MigrateOptions, RequestError> {
        let mut o = MigrateOptions::new(self.to.clone());
        if let Some(t) = self.peer_timeout_ms {
            if t < 100 {
                return Err(RequestError::PeerTimeout(t));
            }
            o.peer_timeout = Duration::from_millis(t);
        }
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
        o.delta = self.delta != Some(false);
        o.dedup = self.dedup != Some(false);
        o.host_cache = self.host_cache;
        o.vcpu_yield = self.vcpu_yield != Some(false);
        o.storage = self.storage.unwrap_or_default();
        o.remove_source = self.remove_source;
        o.disk_sync = self.disk_sync;
        if let Some(p) = self.postcopy {
            o.postcopy = p;
        }
        if let Some(c) = self.delta_cache {
            if c > MAX_DELTA_CACHE {
                return Err(RequestError::DeltaCache {
                    mib: c >> 20,
                    max_mib: MAX_DELTA_CACHE >> 20,
                });
            }
            o.delta_cache = Some(c);
        }
        if let Some(cap) = self.max_bandwidth {
            check_bandwidth(cap, o.peer_timeout)?;
        }
        o.max_bandwidth = self.max_bandwidth;
        o.channels = self.channels.unwrap_or(0);
        o.name.clone_from(&self.name);
        o.origin.clone_from(&self.origin);
        o.generation = self.generation;
        o.session = self.session;
        o.hold_raw.store(
            self.codec == Some(crate::api::CodecMode::Raw),
            std::sync::atomic::Ordering::Relaxed,
        );
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
        assert!(!o.hold_raw.load(std::sync::atomic::Ordering::Relaxed));
    }

    #[test]
    fn a_compressed_migration_asked_to_start_raw_holds_its_batches_raw_from_the_first() {
        let r: MigrateRequest =
            serde_json::from_str(r#"{"to":"a:1","transport":"compressed","codec":"raw"}"#).unwrap();
        assert_eq!(r.codec, Some(crate::api::CodecMode::Raw));
        assert!(r
            .options()
            .unwrap()
            .hold_raw
            .load(std::sync::atomic::Ordering::Relaxed));
        let auto = MigrateRequest {
            codec: Some(crate::api::CodecMode::Auto),
            ..r
        };
        assert!(!auto
            .options()
            .unwrap()
            .hold_raw
            .load(std::sync::atomic::Ordering::Relaxed));
        assert!(serde_json::from_str::<MigrateRequest>(r#"{"to":"a:1","codec":"zip"}"#).is_err());
    }

    #[test]
    fn a_cap_below_what_the_peer_timeout_allows_is_refused_with_the_minimum() {
        let min = min_bandwidth(Duration::from_secs(5));
        assert!((3_000_000..4_000_000).contains(&min), "{min}");
        let r = MigrateRequest {
            max_bandwidth: Some(1_000_000),
            ..MigrateRequest::new("a:1")
        };
        let e = r.options().unwrap_err().to_string();
        assert!(e.contains("below the minimum 3.36 Mbit/s"), "{e}");
        let r = MigrateRequest {
            max_bandwidth: Some(200_000_000),
            ..MigrateRequest::new("a:1")
        };
        assert!(r.options().is_ok());
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
