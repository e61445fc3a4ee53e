//! The connection to etcd: blocking calls (the agent and the CLI are threads, not tasks) on a
//! runtime of the client's own, each bounded by the request timeout.
use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};

use crate::ClusterError;

/// Where the cluster's keys live.
pub const PREFIX: &str = "/livemig/";

/// The client certificate and CA etcd is reached with (`--cluster-ca/-cert/-key`).
#[derive(Clone, Debug)]
pub struct ClusterTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How to reach the cluster's etcd.
#[derive(Clone, Debug)]
pub struct Endpoints {
    /// `http://H:2379` or `https://H:2379`, one per member.
    pub urls: Vec<String>,
    pub tls: Option<ClusterTls>,
    /// Every request's deadline.
    pub timeout: Duration,
}

impl Endpoints {
    /// A comma-separated list of member URLs, plaintext.
    pub fn parse(list: &str) -> Result<Self, ClusterError> {
        let urls: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(String::from)
            .collect();
        if urls.is_empty() || urls.len() > 16 {
            return Err(ClusterError::Endpoints(format!(
                "{list:?}: 1 to 16 member URLs (http://HOST:2379,...)"
            )));
        }
        if let Some(bad) = urls
            .iter()
            .find(|u| !(u.starts_with("http://") || u.starts_with("https://")))
        {
            return Err(ClusterError::Endpoints(format!(
                "{bad:?}: a member URL is http://HOST:PORT or https://HOST:PORT"
            )));
        }
        Ok(Endpoints {
            urls,
            tls: None,
            timeout: Duration::from_secs(5),
        })
    }
}

impl Endpoints {
    /// The same endpoints as `livemig` arguments, for a process started from here.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec!["--cluster".to_string(), self.urls.join(",")];
        if let Some(t) = &self.tls {
            for (flag, p) in [
                ("--cluster-ca", &t.ca),
                ("--cluster-cert", &t.cert),
                ("--cluster-key", &t.key),
            ] {
                a.push(flag.into());
                a.push(p.display().to_string());
            }
        }
        a
    }
}

/// A connected client.
pub struct Store {
    rt: tokio::runtime::Runtime,
    client: Client,
    timeout: Duration,
}

impl Store {
    pub fn connect(e: &Endpoints) -> Result<Self, ClusterError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd")
            .enable_all()
            .build()
            .map_err(ClusterError::Runtime)?;
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(e.timeout)
            .with_timeout(e.timeout);
        if let Some(t) = &e.tls {
            opts = opts.with_tls(tls_options(t)?);
        }
        let client = rt
            .block_on(async {
                tokio::time::timeout(e.timeout, Client::connect(e.urls.clone(), Some(opts))).await
            })
            .map_err(|_| ClusterError::Unreachable {
                urls: e.urls.join(","),
                why: format!("no answer within {:?}", e.timeout),
            })?
            .map_err(|err| ClusterError::Unreachable {
                urls: e.urls.join(","),
                why: err.to_string(),
            })?;
        Ok(Store {
            rt,
            client,
            timeout: e.timeout,
        })
    }

    /// Runs one request to its end or its deadline. A member that is down answers at once
    /// that it is unavailable: the request goes again (the client's balancer takes another
    /// member) until the deadline.
    fn call<T, F, Fut>(&self, what: &'static str, f: F) -> Result<T, ClusterError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let answer = self.rt.block_on(async {
            loop {
                let tried = tokio::time::timeout_at(deadline, f(self.client.clone())).await;
                match tried {
                    Ok(Err(e)) if unavailable(&e) && tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(RETRY_UNAVAILABLE).await;
                    }
                    other => break other,
                }
            }
        });
        answer
            .map_err(|_| ClusterError::Request {
                what,
                why: format!("no answer within {:?}", self.timeout),
            })?
            .map_err(|e| ClusterError::Request {
                what,
                why: e.to_string(),
            })
    }

    /// Every key under `PREFIX + dir` and its value (text), ascending; read a page of
    /// [`LIST_PAGE`] keys at a time, so that no answer outgrows a gRPC message.
    pub fn list(&self, dir: &str) -> Result<Vec<(String, String)>, ClusterError> {
        let prefix = format!("{PREFIX}{dir}");
        let end = prefix_end(prefix.as_bytes());
        let skip = prefix.len();
        let mut from = prefix.clone().into_bytes();
        let mut out = Vec::new();
        loop {
            let r = self.call("listing keys", |mut c| {
                let (key, end) = (from.clone(), end.clone());
                let opts = GetOptions::new().with_range(end).with_limit(LIST_PAGE);
                async move { c.get(key, Some(opts)).await }
            })?;
            for kv in r.kvs() {
                let (Ok(k), Ok(v)) = (kv.key_str(), kv.value_str()) else {
                    continue;
                };
                if let Some(name) = k.get(skip..) {
                    out.push((name.to_string(), v.to_string()));
                }
            }
            match r.kvs().last() {
                Some(last) if r.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    /// Writes `PREFIX + key`, under `lease` if given.
    pub fn put(&self, key: &str, value: &str, lease: Option<i64>) -> Result<(), ClusterError> {
        let k = format!("{PREFIX}{key}");
        self.call("writing a key", |mut c| {
            let (k, v) = (k.clone(), value.to_string());
            let opts = lease.map(|l| PutOptions::new().with_lease(l));
            async move { c.put(k, v, opts).await }
        })?;
        Ok(())
    }

    /// Writes every (key, value) under `PREFIX`, under `lease` if given: in transactions of
    /// at most 128 writes (etcd's default limit per transaction).
    pub fn put_many(
        &self,
        pairs: &[(String, String)],
        lease: Option<i64>,
    ) -> Result<(), ClusterError> {
        for chunk in pairs.chunks(128) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(k, v)| {
                    let opts = lease.map(|l| PutOptions::new().with_lease(l));
                    TxnOp::put(format!("{PREFIX}{k}"), v.clone(), opts)
                })
                .collect();
            self.txn("writing keys", &Txn::new().and_then(ops))?;
        }
        Ok(())
    }

    /// Runs `txn`; whether its comparisons held.
    fn txn(&self, what: &'static str, txn: &Txn) -> Result<bool, ClusterError> {
        let r = self.call(what, |mut c| {
            let t = txn.clone();
            async move { c.txn(t).await }
        })?;
        Ok(r.succeeded())
    }

    /// Writes `PREFIX + key` only if it does not exist; whether it did not.
    pub fn create(&self, key: &str, value: &str) -> Result<bool, ClusterError> {
        let k = format!("{PREFIX}{key}");
        let txn = Txn::new()
            .when([Compare::create_revision(k.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(k, value.to_string(), None)]);
        self.txn("creating a key", &txn)
    }

    /// The value of `PREFIX + key`, if it exists.
    pub fn get(&self, key: &str) -> Result<Option<String>, ClusterError> {
        let k = format!("{PREFIX}{key}");
        let r = self.call("reading a key", |mut c| {
            let k = k.clone();
            async move { c.get(k, None).await }
        })?;
        Ok(r.kvs()
            .first()
            .and_then(|kv| kv.value_str().ok())
            .map(String::from))
    }

    /// Replaces `PREFIX + key` with `new` only if it holds `old`; whether it did.
    pub fn swap(&self, key: &str, old: &str, new: &str) -> Result<bool, ClusterError> {
        let k = format!("{PREFIX}{key}");
        let txn = Txn::new()
            .when([Compare::value(k.clone(), CompareOp::Equal, old.to_string())])
            .and_then([TxnOp::put(k, new.to_string(), None)]);
        self.txn("swapping a key", &txn)
    }

    /// Deletes `PREFIX + key` only if it holds `old`; whether it did.
    pub fn delete_if(&self, key: &str, old: &str) -> Result<bool, ClusterError> {
        let k = format!("{PREFIX}{key}");
        let txn = Txn::new()
            .when([Compare::value(k.clone(), CompareOp::Equal, old.to_string())])
            .and_then([TxnOp::delete(k, None)]);
        self.txn("deleting a key", &txn)
    }

    pub fn delete(&self, key: &str) -> Result<(), ClusterError> {
        let k = format!("{PREFIX}{key}");
        self.call("deleting a key", |mut c| {
            let k = k.clone();
            async move { c.delete(k, None).await }
        })?;
        Ok(())
    }

    /// A lease of `ttl` (whole seconds, at least 1); its id.
    pub fn grant(&self, ttl: Duration) -> Result<i64, ClusterError> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let r = self.call("granting a lease", |mut c| async move {
            c.lease_grant(secs, None).await
        })?;
        Ok(r.id())
    }

    /// Renews `lease` once; the TTL it has now (0 or less: it has expired).
    pub fn keep_alive(&self, lease: i64) -> Result<i64, ClusterError> {
        self.call("renewing the lease", |mut c| async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            Ok(stream.message().await?.map_or(0, |m| m.ttl()))
        })
    }

    pub fn revoke(&self, lease: i64) -> Result<(), ClusterError> {
        self.call("revoking the lease", |mut c| async move {
            c.lease_revoke(lease).await
        })?;
        Ok(())
    }
}

/// Keys per page of a listing.
const LIST_PAGE: i64 = 500;

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: to the end of the keyspace.
    vec![0]
}

/// How soon a request a member refused as unavailable goes again.
const RETRY_UNAVAILABLE: Duration = Duration::from_millis(100);

/// Whether `e` says only that the member asked is down (another may answer).
fn unavailable(e: &etcd_client::Error) -> bool {
    // gRPC's UNAVAILABLE.
    const UNAVAILABLE: i32 = 14;
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => s.code() as i32 == UNAVAILABLE,
        _ => false,
    }
}

fn tls_options(t: &ClusterTls) -> Result<etcd_client::TlsOptions, ClusterError> {
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|e| ClusterError::Credentials {
            path: p.clone(),
            why: e.to_string(),
        })
    };
    let ca = etcd_client::Certificate::from_pem(read(&t.ca)?);
    let id = etcd_client::Identity::from_pem(read(&t.cert)?, read(&t.key)?);
    Ok(etcd_client::TlsOptions::new()
        .ca_certificate(ca)
        .identity(id))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_prefix_ends_at_its_last_byte_plus_one() {
        assert_eq!(super::prefix_end(b"/livemig/hosts/"), b"/livemig/hosts0");
        assert_eq!(super::prefix_end(b"a\xff"), b"b");
    }
}
