//! Incoming migrations: the agent reads what the source offers, admits it (room, name,
//! `--max-inbound`) before anything is built, starts a receiver process for that one session
//! and redirects the source to it. What became of each arrival is kept, so a source whose
//! switchover's outcome is unknown can learn whether it may resume.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use migration::protocol::Prepare;
use migration::Pending;

use super::vms::{self, Entry, Phase, Proc, Record};
use super::{AdmitError, Agent};
use crate::api::IncomingFate;
use crate::status::Incoming;

/// A source's Config, and when it came.
struct Offered {
    prepare: Prepare,
    at: Instant,
}

/// `--cpu-features -a,-b` for a child, if anything is masked.
pub(super) fn mask_args(mask: &[String]) -> Vec<String> {
    if mask.is_empty() {
        return Vec::new();
    }
    let list: Vec<String> = mask.iter().map(|f| format!("-{f}")).collect();
    vec!["--cpu-features".into(), list.join(",")]
}

/// How long a receiver has to say which port it listens on.
const LISTEN_WITHIN: Duration = Duration::from_secs(10);

impl Agent {
    /// A source said hello on the agent's address: hand its VM to a receiver of its own.
    pub(super) fn on_migration(self: &Arc<Self>, mut p: Pending) {
        let peer = p.peer;
        let offer = match p.offer(self.cfg.peer_timeout) {
            Ok(o) => Offered {
                prepare: o,
                at: Instant::now(),
            },
            Err(e) => {
                tracing::warn!("incoming migration from {peer}: {e}");
                return;
            }
        };
        match self.arrive(&offer, peer) {
            Ok(port) => {
                if let Err(e) = self.incoming.redirect(p, offer.prepare.session, port) {
                    // Its receiver gives up by itself (--accept-within).
                    tracing::warn!("redirecting the migration from {peer}: {e}");
                }
            }
            Err(why) if why.is_busy() => {
                tracing::info!("turned a migration from {peer} away for now: {why}");
                p.busy(&why.to_string());
            }
            Err(why) => {
                tracing::warn!("refused a migration from {peer}: {why}");
                p.refuse(&why.to_string());
            }
        }
    }

    /// Admits the offered VM and starts its receiver; the port it listens on.
    fn arrive(&self, offered: &Offered, peer: SocketAddr) -> Result<u16, AdmitError> {
        let offer = &offered.prepare;
        let name = offer
            .name
            .clone()
            .unwrap_or_else(|| format!("vm-{:016x}", offer.session));
        {
            let mut vms = locks::lock(&self.vms);
            // An earlier attempt's receiver that just ended must not hold the name.
            self.reap_in(&mut vms);
            self.admit(&vms, &name, &offer.vm, true)?;
            let e =
                self.start_receiver(&name, offered, peer)
                    .map_err(|e| AdmitError::Receiver {
                        name: name.clone(),
                        why: e.to_string(),
                    })?;
            vms.insert(name.clone(), e);
        }
        let port = self
            .wait_listening(&name)
            .map_err(|why| AdmitError::Receiver {
                name: name.clone(),
                why,
            });
        if port.is_err() {
            if let Some(mut e) = locks::lock(&self.vms).remove(&name) {
                e.proc.kill();
                e.proc.wait_exit(Duration::from_secs(5));
                self.forget(e, IncomingFate::NeverRan);
            }
        }
        port
    }

    fn start_receiver(
        &self,
        name: &str,
        offered: &Offered,
        peer: SocketAddr,
    ) -> std::io::Result<Entry> {
        let offer = &offered.prepare;
        // A source that does not follow the redirect frees the slot within its deadline on
        // progress, counted from its Config.
        let accept_within = self
            .cfg
            .peer_timeout
            .saturating_sub(offered.at.elapsed())
            .max(self.cfg.peer_timeout / 2);
        let dir = self.cfg.dir.join("vms").join(name);
        std::fs::create_dir_all(&dir)?;
        let api = vms::api_of(&dir);
        // Any address of the listener's family: a multichannel source reaches each NIC.
        let any = if self.listen.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let mut args: Vec<String> = vec![
            "receive".into(),
            "--listen".into(),
            any.into(),
            "--api".into(),
            api.display().to_string(),
            "--console".into(),
            dir.join("console.log").display().to_string(),
            "--status-file".into(),
            dir.join("incoming.json").display().to_string(),
            "--expect-session".into(),
            offer.session.to_string(),
            "--accept-within".into(),
            format!("{}ms", accept_within.as_millis()),
            "--peer-timeout".into(),
            format!("{}ms", self.cfg.peer_timeout.as_millis()),
        ];
        args.extend(self.cache_args(offer.host_cache));
        args.extend(self.commit_args());
        args.extend(mask_args(&self.cfg.cpu_mask));
        let child = vms::spawn(&self.cfg.livemig, &args, &dir)?;
        let e = Entry {
            rec: Record {
                name: name.into(),
                memory: offer.vm.memory,
                vcpus: offer.vm.vcpus,
                origin: offer
                    .origin
                    .clone()
                    .unwrap_or_else(|| peer.ip().to_string()),
                pid: child.id(),
                session: Some(offer.session),
                cpu_features: offer.vm.cpu_features.clone(),
            },
            proc: Proc::Child(child),
            phase: Phase::Arriving,
            dir,
        };
        e.save()?;
        Ok(e)
    }

    /// The port `name`'s receiver listens on, once its status file says so.
    fn wait_listening(&self, name: &str) -> Result<u16, String> {
        let t = Instant::now();
        loop {
            {
                let mut vms = locks::lock(&self.vms);
                let e = vms
                    .get_mut(name)
                    .ok_or_else(|| format!("{name}'s receiver went away"))?;
                if let Some(Incoming::Listening { port }) = e.status_file().read() {
                    return Ok(port);
                }
                if let Some(how) = e.proc.exited() {
                    return Err(format!(
                        "{name}'s receiver exited ({how}): {}",
                        e.log_tail()
                    ));
                }
            }
            if t.elapsed() > LISTEN_WITHIN {
                return Err(format!(
                    "{name}'s receiver did not listen within {LISTEN_WITHIN:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What became of incoming migration `session`. With `abandon`, one still arriving is
    /// ended first (its receiver killed), so the answer is final: `NeverRan` is the proof
    /// that the VM did not run here and never will.
    pub(super) fn fate(&self, session: u64, abandon: bool) -> IncomingFate {
        let mut vms = locks::lock(&self.vms);
        let found = vms
            .iter()
            .find(|(_, e)| e.rec.session == Some(session))
            .map(|(n, _)| n.clone());
        let Some(name) = found else {
            return locks::lock(&self.fates)
                .iter()
                .rev()
                .find(|(s, _)| *s == session)
                .map_or(IncomingFate::Unknown, |(_, f)| f.clone());
        };
        let Some(e) = vms.get_mut(&name) else {
            return IncomingFate::Unknown;
        };
        if e.phase != Phase::Arriving || e.status_file().read().is_some_and(|s| s.may_have_run()) {
            return IncomingFate::Confirmed;
        }
        if !abandon && e.proc.exited().is_none() {
            return IncomingFate::Arriving;
        }
        e.proc.kill();
        if !e.proc.wait_exit(Duration::from_secs(5)) {
            return IncomingFate::Arriving;
        }
        // It may have recorded `running` just before it died.
        if e.status_file().read().is_some_and(|s| s.may_have_run()) {
            e.phase = Phase::Failed("killed by abandon after the VM started running".into());
            return IncomingFate::Confirmed;
        }
        tracing::warn!(name = %name, "abandoned incoming migration {session:#x}: the VM never ran here");
        if let Some(e) = vms.remove(&name) {
            self.forget(e, IncomingFate::NeverRan);
        }
        IncomingFate::NeverRan
    }
}
