//! The milestones of one incoming migration, written by its receiver (`livemig receive
//! --status-file`) and read by the host agent. `running` is on disk before the vCPUs start:
//! an agent that finds a receiver gone without it can prove the VM never ran here.
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use migration::{Events, ReceiveEvent};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Incoming {
    Listening { port: u16 },
    Receiving { session: u64, name: Option<String> },
    Running,
    Failed { error: String },
}

impl Incoming {
    pub fn listening(port: u16) -> Self {
        Incoming::Listening { port }
    }
    pub fn failed(error: &str) -> Self {
        Incoming::Failed {
            error: error.to_string(),
        }
    }
    /// Whether the VM may have run on this host.
    pub fn may_have_run(&self) -> bool {
        *self == Incoming::Running
    }
}

/// A status file, replaced atomically on each write; synced to disk for `running` only.
#[derive(Clone, Debug)]
pub struct StatusFile(pub PathBuf);

impl StatusFile {
    pub fn new(path: PathBuf) -> Self {
        StatusFile(path)
    }

    /// Replaces the file with `s`. Only `running` is synced (the file, then its directory):
    /// it is the one milestone an agent reads after a crash to prove the VM never ran here.
    /// A sync waits for the file system's journal, and with it for the host's other writes:
    /// nothing is written between the pause and the Confirm (docs/drain.md).
    pub fn write(&self, s: &Incoming) -> std::io::Result<()> {
        let tmp = self.0.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(s).map_err(std::io::Error::other)?)?;
        let durable = s.may_have_run();
        if durable {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.0)?;
        if let Some(dir) = self.0.parent().filter(|_| durable) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    pub fn read(&self) -> Option<Incoming> {
        serde_json::from_slice(&std::fs::read(&self.0).ok()?).ok()
    }

    /// The receiver's milestones into this file. `running` that cannot be recorded stops the
    /// process before the vCPUs start: a VM that ran unrecorded would break the agent's proof.
    pub fn events(&self) -> Events {
        let f = self.clone();
        Events(Arc::new(move |e: &ReceiveEvent| {
            let s = match e {
                ReceiveEvent::Receiving { session, name } => Incoming::Receiving {
                    session: *session,
                    name: name.clone(),
                },
                ReceiveEvent::Running => Incoming::Running,
            };
            if let Err(err) = f.write(&s) {
                eprintln!(
                    "livemig: recording {s:?} in {} failed: {err}",
                    f.0.display()
                );
                if s.may_have_run() {
                    std::process::exit(3);
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milestones_round_trip_through_the_file() {
        let d = tempfile::tempdir().unwrap();
        let f = StatusFile::new(d.path().join("incoming.json"));
        assert_eq!(f.read(), None);
        f.write(&Incoming::listening(7001)).unwrap();
        assert_eq!(f.read(), Some(Incoming::Listening { port: 7001 }));
        (f.events().0)(&ReceiveEvent::Running);
        assert!(f.read().unwrap().may_have_run());
    }
}
