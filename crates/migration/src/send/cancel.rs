//! Cancelling a migration from another thread (the API's `DELETE /vm/migration`, a client that
//! went away): up to the switchover's point of no return the migration stops at once and the
//! VM keeps running here; after it, a cancel is refused, because the VM's fate is then the
//! destination's.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use transport::{RateLimit, ShutdownHandle};

use crate::MigrationError;

#[derive(Default)]
struct State {
    reason: Option<String>,
    committed: bool,
    sockets: Vec<ShutdownHandle>,
    /// The migration's pace: a sender waiting on it stops waiting.
    limits: Vec<Arc<RateLimit>>,
}

/// A handle on one migration that can stop it; clones share it.
#[derive(Clone, Default)]
pub struct Cancel {
    requested: Arc<AtomicBool>,
    state: Arc<Mutex<State>>,
}

/// Why a cancel came too late.
pub const TOO_LATE: &str =
    "the switchover is under way: the VM may already be running on the destination";

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cancel(requested: {})", self.requested())
    }
}

impl Cancel {
    /// Stops the migration: its sockets close at once, so nothing waits on the network.
    pub fn request(&self, why: &str) -> Result<(), &'static str> {
        let mut s = locks::lock(&self.state);
        if s.committed {
            return Err(TOO_LATE);
        }
        s.reason.get_or_insert_with(|| why.to_string());
        self.requested.store(true, Ordering::SeqCst);
        s.sockets.iter().for_each(ShutdownHandle::shutdown);
        s.limits.iter().for_each(|l| l.abort());
        Ok(())
    }

    /// Whether a cancel was asked for.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Relaxed)
    }

    /// Closes `h` when the migration is cancelled (at once if it already is).
    pub(crate) fn watch(&self, h: ShutdownHandle) {
        let mut s = locks::lock(&self.state);
        if s.reason.is_some() {
            h.shutdown();
        }
        s.sockets.push(h);
    }

    /// Ends every wait on `l` when the migration is cancelled (at once if it already is).
    pub(crate) fn watch_limit(&self, l: Arc<RateLimit>) {
        let mut s = locks::lock(&self.state);
        if s.reason.is_some() {
            l.abort();
        }
        s.limits.push(l);
    }

    /// Err(Cancelled) once a cancel was asked for.
    pub(crate) fn check(&self) -> Result<(), MigrationError> {
        if !self.requested() {
            return Ok(());
        }
        Err(self.error())
    }

    /// The error a cancelled migration ends with.
    pub(crate) fn error(&self) -> MigrationError {
        MigrationError::Cancelled(
            locks::lock(&self.state)
                .reason
                .clone()
                .unwrap_or_else(|| "cancelled".into()),
        )
    }

    /// The point of no return: from here a cancel is refused. Fails if one came first.
    pub(crate) fn commit(&self) -> Result<(), MigrationError> {
        let mut s = locks::lock(&self.state);
        if s.reason.is_some() {
            drop(s);
            return Err(self.error());
        }
        s.committed = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_counts_until_the_commit_and_is_refused_after() {
        let c = Cancel::default();
        assert!(c.check().is_ok());
        c.request("operator said so").unwrap();
        assert!(matches!(c.check(), Err(MigrationError::Cancelled(r)) if r == "operator said so"));
        assert!(c.commit().is_err(), "a cancel before the commit wins");

        let c = Cancel::default();
        c.commit().unwrap();
        assert_eq!(c.request("late"), Err(TOO_LATE));
        assert!(c.check().is_ok());
    }
}
