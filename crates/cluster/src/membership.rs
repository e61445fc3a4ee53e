//! A host's membership: its member key (once), and its record under a lease that a thread of
//! its own keeps alive. The record is written again when it changes; a lease that lapsed (etcd
//! lost for longer than the TTL) is granted again, and the host is live again.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::{ClusterError, Endpoints, HostRecord, Member, Store};

/// How long a host stays live in the cluster's eyes after its last renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(5);

/// What describes the host now (called on the membership thread every renewal).
pub type Describe = Box<dyn Fn() -> HostRecord + Send>;

/// A joined host; leaving (drop) revokes its lease.
pub struct Membership {
    name: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Membership {
    /// Joins the cluster at `endpoints` as `describe()` names the host: a live host of that
    /// name elsewhere is refused (once its lease would have lapsed, a restart takes its place).
    pub fn join(
        endpoints: &Endpoints,
        ttl: Duration,
        describe: Describe,
    ) -> Result<Self, ClusterError> {
        let store = Store::connect(endpoints)?;
        let record = describe();
        let name = record.name.clone();
        wait_until_free(&store, &name, ttl)?;
        let joined_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let member = Member {
            name: name.clone(),
            joined_ms,
        };
        store.create(&format!("members/{name}"), &to_json(&member))?;
        let lease = store.grant(ttl)?;
        store.put(&format!("hosts/{name}"), &to_json(&record), Some(lease))?;
        tracing::info!(host = %name, lease, "joined the cluster");
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("membership".into())
            .spawn(move || keep(&store, (lease, record), ttl, &describe, &s))
            .map_err(ClusterError::Thread)?;
        Ok(Membership {
            name,
            stop,
            thread: Some(thread),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits for a live record of `name` (a previous agent's, or another host's) to lapse.
fn wait_until_free(store: &Store, name: &str, ttl: Duration) -> Result<(), ClusterError> {
    let t = Instant::now();
    while store.list("hosts/")?.iter().any(|(k, _)| k == name) {
        if t.elapsed() > ttl + Duration::from_secs(1) {
            return Err(ClusterError::NameTaken { name: name.into() });
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

/// The membership thread: renews every third of the TTL, writes the record when it changed,
/// grants a new lease when the old one lapsed; revokes it on the way out.
fn keep(
    store: &Store,
    (mut lease, mut written): (i64, HostRecord),
    ttl: Duration,
    describe: &Describe,
    stop: &AtomicBool,
) {
    let every = ttl / 3;
    let mut next = Instant::now() + every;
    let mut renewed_at = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100).min(every));
        if Instant::now() < next {
            continue;
        }
        next = Instant::now() + every;
        let renewed = match store.keep_alive(lease) {
            Ok(left) if left > 0 => true,
            Ok(_) => false,
            // Past its TTL without a renewal the lease is gone (etcd says "lease not found"
            // once it answers again): take a new one.
            Err(e) if renewed_at.elapsed() > ttl => {
                tracing::warn!("cluster: {e}");
                false
            }
            Err(e) => {
                tracing::warn!("cluster: {e}");
                continue;
            }
        };
        if renewed {
            renewed_at = Instant::now();
        }
        let now = describe();
        let result = if renewed {
            if now == written {
                continue;
            }
            store.put(&format!("hosts/{}", now.name), &to_json(&now), Some(lease))
        } else {
            tracing::warn!(host = %now.name, "cluster: the lease lapsed; joining again");
            store.grant(ttl).and_then(|l| {
                lease = l;
                renewed_at = Instant::now();
                store.put(&format!("hosts/{}", now.name), &to_json(&now), Some(lease))
            })
        };
        match result {
            Ok(()) => written = now,
            Err(e) => tracing::warn!("cluster: {e}"),
        }
    }
    if let Err(e) = store.revoke(lease) {
        tracing::warn!("cluster: leaving: {e}");
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}
