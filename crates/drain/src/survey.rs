//! Before a drain: what the source runs, what each destination can take, what each link
//! carries (a probe from the source's agent), and how each VM behaves (sampled from its
//! dirty log). Mechanism only; the plan decides.
use std::net::IpAddr;
use std::time::{Duration, Instant};

use host::{HostClient, VmInfo};

use crate::plan::DestFacts;
use crate::predict::VmFacts;
use crate::{Concurrency, DrainError, DrainOptions};

/// A destination agent and the way to it.
pub struct Dest {
    /// Its agent's API, when this process reaches it (not a cluster member elsewhere).
    pub client: Option<HostClient>,
    /// Where its VMs' disk images must be, when its agent cannot be asked.
    pub storage: Option<Vec<std::path::PathBuf>>,
    pub name: String,
    /// What sources connect to.
    pub address: String,
    pub max_inbound: usize,
    pub facts: DestFacts,
}

pub struct Survey {
    pub source: String,
    pub client: HostClient,
    /// The VMs to move.
    pub vms: Vec<VmFacts>,
    /// VMs left alone, and why.
    pub skipped: Vec<(VmInfo, String)>,
    pub dests: Vec<Dest>,
    /// The hosts' CPU, read from the survey's start (None: an agent did not say).
    pub cpu: Option<crate::cpu::Meter>,
    /// What each of its steps took.
    pub took: crate::report::SurveyTook,
}

pub fn survey(o: &DrainOptions) -> Result<Survey, DrainError> {
    let (started, mut took) = (Instant::now(), crate::report::SurveyTook::default());
    let client = HostClient::new(&o.from);
    let src = |source| DrainError::Source {
        path: o.from.clone(),
        source,
    };
    let source = client.capacity().map_err(src)?.name;
    let (running, skipped): (Vec<VmInfo>, Vec<VmInfo>) = client
        .list()
        .map_err(src)?
        .into_iter()
        .partition(|v| v.state == "running");
    let skipped = skipped
        .into_iter()
        .map(|v| {
            let why = format!("it is {}", v.state);
            (v, why)
        })
        .collect();
    let mut dests =
        o.to.iter()
            .map(destination)
            .collect::<Result<Vec<_>, _>>()?;
    took.agents_ms = ms_since(started);
    if o.probe_ms > 0 {
        timed(&mut took.probe_ms, || probe_links(o, &client, &mut dests));
    }
    // The guests' share before the drain is read over the sampling, not the probe's load.
    let (cpu, vms) = timed(&mut took.sample_ms, || {
        (
            meter(&source, &client, &dests),
            sample_vms(o, &client, running),
        )
    });
    timed(&mut took.agents_ms, || reach_disks(&vms, &mut dests));
    Ok(Survey {
        source,
        client,
        vms,
        skipped,
        dests,
        cpu,
        took,
    })
}

fn ms_since(t: Instant) -> u64 {
    t.elapsed().as_millis() as u64
}

/// `f`'s result, adding the milliseconds it took to `ms`.
fn timed<T>(ms: &mut u64, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    *ms += ms_since(started);
    out
}

/// Starts reading the CPU of the source and of every destination this process reaches.
fn meter(source: &str, client: &HostClient, dests: &[Dest]) -> Option<crate::cpu::Meter> {
    crate::cpu::Meter::start(
        (source.to_string(), client.clone()),
        dests
            .iter()
            .map(|d| (d.name.clone(), d.client.clone()))
            .collect(),
    )
}

fn destination(d: &crate::Destination) -> Result<Dest, DrainError> {
    let (sock, address) = match d {
        crate::Destination::Agent { sock, address } => (sock, address),
        crate::Destination::Member(m) => return Ok(member(m)),
    };
    let client = HostClient::new(sock);
    let cap = client
        .capacity()
        .map_err(|source| DrainError::Destination {
            path: sock.clone(),
            source,
        })?;
    let address = match address {
        Some(a) => a.clone(),
        None => {
            let unspecified = cap
                .listen
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|a| a.ip().is_unspecified());
            if unspecified {
                return Err(DrainError::NoAddress {
                    name: cap.name.clone(),
                    listen: cap.listen.clone(),
                });
            }
            cap.listen.clone()
        }
    };
    Ok(Dest {
        client: Some(client),
        storage: None,
        name: cap.name.clone(),
        address,
        max_inbound: cap.max_inbound.max(1),
        facts: DestFacts {
            name: cap.name,
            room: cap.room,
            rate: None,
            rate_is_floor: false,
            bridge: cap.bridge.is_some(),
            unreachable: Vec::new(),
            copy_room: cap.copy_room,
            cpu_features: cap.cpu_features.map(|f| f.into_iter().collect()),
        },
    })
}

fn member(m: &crate::Member) -> Dest {
    Dest {
        client: None,
        storage: Some(m.storage.clone()),
        name: m.name.clone(),
        address: m.address.clone(),
        max_inbound: m.max_inbound.max(1),
        facts: DestFacts {
            name: m.name.clone(),
            room: m.room,
            rate: None,
            rate_is_floor: false,
            bridge: m.bridge,
            unreachable: Vec::new(),
            // Copies need its disk directory's free space, which only its agent knows.
            copy_room: None,
            cpu_features: (!m.cpu_features.is_empty())
                .then(|| m.cpu_features.iter().cloned().collect()),
        },
    }
}

/// The paths one migration to `address` takes: its NIC pairs under `--network`, else the
/// address itself.
pub fn paths(o: &DrainOptions, address: &str) -> Vec<(Option<IpAddr>, String)> {
    let port = address.rsplit_once(':').map_or("", |(_, p)| p);
    match o
        .request
        .network
        .as_deref()
        .map(migration::request::parse_network)
    {
        Some(Ok(pairs)) => pairs
            .into_iter()
            .map(|(l, r)| (Some(l), format!("{r}:{port}")))
            .collect(),
        _ => vec![(None, address.to_string())],
    }
}

/// Streams per path to probe a destination's link with: as many as the migrations the plan
/// expects to it at once (a stream may be capped by something other than the link, such as
/// one core's TLS), within what one probe may run.
pub fn probe_streams(c: Concurrency, dests: usize, paths: usize) -> usize {
    let at_once = match c {
        Concurrency::Fixed(n) => n.div_ceil(dests.max(1)),
        Concurrency::Auto => crate::run::AUTO_ETA_WINDOW,
    };
    at_once.clamp(1, (host::probe::MAX_PROBE_STREAMS / paths.max(1)).max(1))
}

/// Measures each destination's link from the source's agent, one at a time (so they do not
/// share a NIC while measured), and whether the cores rather than the link held the probe
/// back. A failed probe leaves the rate unknown and says so.
fn probe_links(o: &DrainOptions, source: &HostClient, dests: &mut [Dest]) {
    let n = dests.len();
    for d in dests {
        let paths = paths(o, &d.address);
        let streams = probe_streams(o.concurrency, n, paths.len());
        let probe = source
            .waiting(Duration::from_millis(o.probe_ms * 2 + 15_000))
            .probe(paths, o.probe_ms, u16::try_from(streams).unwrap_or(1));
        match probe {
            Ok(r) => {
                d.facts.rate = Some(r.bits_per_s / 8.0);
                d.facts.rate_is_floor =
                    crate::plan::held_by_cores(r.sender_runnable, r.receiver_runnable);
            }
            Err(e) => tracing::warn!("could not measure the link to {}: {e}", d.name),
        }
    }
}

/// Asks each destination which of the VMs' disk images it cannot open (a failed question
/// counts every disk as unreachable there, with the reason).
fn reach_disks(vms: &[VmFacts], dests: &mut [Dest]) {
    let mut disks: Vec<_> = vms
        .iter()
        .flat_map(|v| v.needs.disks.iter().cloned())
        .collect();
    disks.sort();
    disks.dedup();
    if disks.is_empty() {
        return;
    }
    for d in dests {
        let Some(client) = &d.client else {
            // A member elsewhere: its storage directories say which disks it reaches.
            let storage = d.storage.as_deref().unwrap_or_default();
            d.facts.unreachable = disks
                .iter()
                .filter(|p| !within(p, storage))
                .map(|p| {
                    let why = format!("outside the storage {} reaches", d.name);
                    (p.clone(), why)
                })
                .collect();
            continue;
        };
        d.facts.unreachable = match disks
            .chunks(host::api::MAX_REACH_PATHS)
            .map(|c| client.reach(c))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(answers) => answers.into_iter().flat_map(|r| r.unreachable).collect(),
            Err(e) => disks
                .iter()
                .map(|p| (p.clone(), format!("asking {}: {e}", d.name)))
                .collect(),
        };
    }
}

/// Whether `path` lies in one of `roots`, read as written (they are another host's paths).
fn within(path: &std::path::Path, roots: &[std::path::PathBuf]) -> bool {
    let plain = path
        .components()
        .all(|c| !matches!(c, std::path::Component::ParentDir));
    plain && path.is_absolute() && roots.iter().any(|r| path.starts_with(r))
}

/// Samples every VM at once (each in its own process): the order, the ETA and each VM's
/// predicted time need it.
fn sample_vms(o: &DrainOptions, source: &HostClient, vms: Vec<VmInfo>) -> Vec<VmFacts> {
    let wanted = o.sample_ms > 0;
    // Only a drain that may use page caches needs to know what the VMs' memory shares.
    let fingerprint = crate::cache::wanted(o);
    let samples: Vec<_> = std::thread::scope(|s| {
        let runs: Vec<_> = vms
            .iter()
            .map(|v| {
                s.spawn(move || {
                    wanted
                        .then(|| source.sample(&v.name, o.sample_ms, fingerprint))
                        .and_then(|r| {
                            r.map_err(|e| tracing::warn!("could not sample {}: {e}", v.name))
                                .ok()
                        })
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().ok().flatten()).collect()
    });
    vms.into_iter()
        .zip(samples)
        .map(|(v, sample)| {
            let self_dup = sample
                .as_ref()
                .filter(|_| dedups(o))
                .map_or(0.0, |s| crate::predict::self_dup_share(&s.fingerprint));
            VmFacts {
                name: v.name,
                memory: v.memory,
                sample,
                delta: o.request.sends_deltas(),
                // Known once the order is (crate::cache::expect_hits).
                cached: 0.0,
                whole_costs: None,
                whole_in_copy: None,
                self_dup,
                vcpus: v.vcpus,
                needs: crate::plan::Needs {
                    disks: v.disks,
                    nics: v.nics,
                    disk_bytes: v.disk_bytes,
                    cpu_features: v.cpu_features,
                },
                postcopy: o
                    .request
                    .postcopy
                    .unwrap_or(migration::policy::DEFAULT_POSTCOPY),
                // Known once the source's learnt costs are read.
                dirty_ratio: 1.0,
            }
        })
        .collect()
}

/// Whether the drain's migrations send a page the VM holds twice as a reference (dedup on,
/// and not the direct transport, which sends guest RAM untouched).
fn dedups(o: &DrainOptions) -> bool {
    o.request.dedup != Some(false)
        && o.request.transport != Some(migration::protocol::Transport::Direct)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_members_disks_are_those_under_its_storage() {
        let roots = vec![std::path::PathBuf::from("/srv/images")];
        assert!(within("/srv/images/a.raw".as_ref(), &roots));
        assert!(!within("/srv/images/../etc/a.raw".as_ref(), &roots));
        assert!(!within("/srv/imagesX/a.raw".as_ref(), &roots));
        assert!(!within("images/a.raw".as_ref(), &roots));
    }

    #[test]
    fn a_link_is_probed_with_as_many_streams_as_migrations_go_at_once() {
        assert_eq!(probe_streams(Concurrency::Auto, 1, 1), 2);
        assert_eq!(probe_streams(Concurrency::Fixed(1), 1, 1), 1);
        assert_eq!(probe_streams(Concurrency::Fixed(3), 2, 1), 2);
        // Within what one probe may run: two paths, two streams each.
        assert_eq!(probe_streams(Concurrency::Fixed(8), 1, 1), 4);
        assert_eq!(probe_streams(Concurrency::Fixed(8), 1, 2), 2);
        assert_eq!(probe_streams(Concurrency::Fixed(8), 1, 8), 1);
    }
}
