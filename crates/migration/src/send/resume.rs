//! A handle on a migration's post-copy recovery: while post-copy's link is down and being
//! made again, `migrate --resume` (`POST /vm/migration/resume`) makes the source try again at
//! once, to the same destination or to another of its addresses (another network), with a
//! new recovery window.
use std::sync::{Arc, Mutex};

/// Clones share it.
#[derive(Clone, Default)]
pub struct Resume(Arc<Mutex<State>>);

#[derive(Default)]
struct State {
    /// Post-copy's link is down and being made again.
    paused: bool,
    /// A resume asked for and not taken yet: where to (None: where it was).
    asked: Option<Option<String>>,
}

impl std::fmt::Debug for Resume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Resume(paused: {})", locks::lock(&self.0).paused)
    }
}

/// Why a resume was refused.
pub const NOT_PAUSED: &str =
    "post-copy is not paused: only a migration whose post-copy link failed can be resumed";

impl Resume {
    /// Asks the paused post-copy to make its link again now, to `to` if given.
    pub fn request(&self, to: Option<String>) -> Result<(), &'static str> {
        let mut s = locks::lock(&self.0);
        if !s.paused {
            return Err(NOT_PAUSED);
        }
        s.asked = Some(to);
        Ok(())
    }

    /// Whether post-copy's link is down and being made again.
    pub fn paused(&self) -> bool {
        locks::lock(&self.0).paused
    }

    pub(super) fn set_paused(&self, paused: bool) {
        let mut s = locks::lock(&self.0);
        s.paused = paused;
        s.asked = None;
    }

    /// The resume asked for since the last look, if any: where to (None: where it was).
    pub(super) fn take(&self) -> Option<Option<String>> {
        locks::lock(&self.0).asked.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_paused_post_copy_takes_a_resume_and_only_once() {
        let r = Resume::default();
        assert_eq!(r.request(None), Err(NOT_PAUSED));
        r.set_paused(true);
        assert!(r.take().is_none());
        r.request(Some("10.0.0.2:7400".into())).unwrap();
        assert_eq!(r.take(), Some(Some("10.0.0.2:7400".into())));
        assert!(r.take().is_none());
        r.set_paused(false);
        assert_eq!(r.request(None), Err(NOT_PAUSED));
    }
}
