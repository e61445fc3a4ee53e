//! Threads' scheduling: their priority, and how they spent their time.
//!
//! - While a VM is being migrated its vCPUs can yield the CPU to the migration's own threads
//!   (a higher nice value, [`lower`]): when the host has idle cores nothing changes, and when
//!   it has none the pages leave at the link's rate instead of the rate a fair share of a core
//!   allows. The priority comes back before the pause, and whenever the migration ends, which
//!   is why it is only lowered where this process may raise it again.
//! - While the VM is paused, the migration's thread goes first ([`boost_current`]), and the
//!   vCPUs while they stop and give their state ([`boost`]): the downtime is the pause, the
//!   last round and the state, and every other guest and migration on the host competes
//!   with them for the cores.
use std::io;

mod times;
pub use times::ThreadTimes;

/// One thread's kernel id.
pub type Tid = libc::pid_t;

/// The least favoured nice value.
const NICE_MAX: i32 = 19;
/// CAP_SYS_NICE's bit in the capability sets of /proc/self/status.
const CAP_SYS_NICE: u32 = 23;

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum PriorityError {
    /// reading the nice value of thread {tid} failed: {source}
    Get { tid: Tid, source: io::Error },
    /// setting thread {tid} to nice {nice} failed: {source}
    Set {
        tid: Tid,
        nice: i32,
        source: io::Error,
    },
    /// the vCPUs keep their priority: this process could not give it back (nice {nice} needs CAP_SYS_NICE or an RLIMIT_NICE of at least {needed})
    CannotRestore { nice: i32, needed: u64 },
    /// the thread keeps its class: real-time priority {needed} needs CAP_SYS_NICE or an RLIMIT_RTPRIO of at least {needed}
    CannotBoost { needed: i32 },
    /// thread {tid} is not time-shared (scheduling class {policy}): it keeps its class
    NotTimeShared { tid: Tid, policy: i32 },
    /// setting thread {tid} to real-time priority {priority} failed: {source}
    SetPolicy {
        tid: Tid,
        priority: i32,
        source: io::Error,
    },
    /// setting a thread just started to scheduling class {policy} at priority {priority} failed: {source}
    SetSpawnedPolicy {
        policy: i32,
        priority: i32,
        source: io::Error,
    },
}

/// Threads whose nice value was raised, and what it was: given back by [`Lowered::restore`]
/// or on drop.
#[derive(Debug)]
pub struct Lowered {
    saved: Vec<(Tid, i32)>,
}

/// Raises the nice value of `tids` by `by` (capped at 19), after checking that this process
/// may lower it again. On an error nothing stays changed.
pub fn lower(tids: &[Tid], by: i32) -> Result<Lowered, PriorityError> {
    let mut lowered = Lowered { saved: Vec::new() };
    for &tid in tids {
        let nice = nice_of(tid)?;
        if !may_set(nice) {
            return Err(PriorityError::CannotRestore {
                nice,
                needed: rlimit_for(nice),
            });
        }
        set_nice(tid, (nice + by).min(NICE_MAX))?;
        lowered.saved.push((tid, nice));
    }
    Ok(lowered)
}

impl Lowered {
    /// The first thread's nice value now (all moved by the same step).
    pub fn nice(&self) -> Option<i32> {
        self.saved.first().and_then(|&(tid, _)| nice_of(tid).ok())
    }

    /// Gives every thread its nice value back; a thread that exited meanwhile is skipped.
    pub fn restore(mut self) {
        self.give_back();
    }

    fn give_back(&mut self) {
        for (tid, nice) in self.saved.drain(..) {
            match set_nice(tid, nice) {
                Ok(()) => {}
                Err(PriorityError::Set { source, .. })
                    if source.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => tracing::warn!("giving a vCPU its priority back: {e}"),
            }
        }
    }
}

impl Drop for Lowered {
    fn drop(&mut self) {
        self.give_back();
    }
}

/// Threads ahead of every time-shared thread on the host until dropped: the real-time FIFO
/// class at its lowest priority. Threads they start meanwhile do not inherit it (reset on
/// fork), and the kernel's real-time throttling still leaves the others their share of each
/// second, so a thread that never blocks cannot take the host.
#[derive(Debug)]
pub struct Boosted {
    tids: Vec<Tid>,
}

/// The real-time priority a boosted thread runs at: the lowest, enough to run before every
/// time-shared thread, below the kernel's own real-time threads (interrupt handlers).
pub const BOOST_PRIORITY: i32 = 1;

/// Puts the calling thread in the real-time FIFO class ([`Boosted`]).
pub fn boost_current() -> Result<Boosted, PriorityError> {
    boost(&[current_tid()])
}

/// Puts `tids` (time-shared threads) in the real-time FIFO class ([`Boosted`]), if this
/// process may (CAP_SYS_NICE, or an RLIMIT_RTPRIO of at least [`BOOST_PRIORITY`]).
/// Dropping the guard gives them back their time-shared class, with the nice values they
/// had. On an error nothing stays changed.
pub fn boost(tids: &[Tid]) -> Result<Boosted, PriorityError> {
    if !has_cap_sys_nice() && rlimit_rtprio() < u64::from(BOOST_PRIORITY.unsigned_abs()) {
        return Err(PriorityError::CannotBoost {
            needed: BOOST_PRIORITY,
        });
    }
    let mut boosted = Boosted { tids: Vec::new() };
    for &tid in tids {
        let policy = policy_of(tid)?;
        if policy != libc::SCHED_OTHER {
            return Err(PriorityError::NotTimeShared { tid, policy });
        }
        set_policy(
            tid,
            libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK,
            BOOST_PRIORITY,
        )?;
        boosted.tids.push(tid);
    }
    Ok(boosted)
}

/// Threads just spawned, boosted like [`Boosted`] by their pthread handle: their kernel ids
/// are not known until they run, which is what a caller waiting for them waits for.
#[derive(Debug)]
pub struct BoostedSpawned {
    threads: Vec<libc::pthread_t>,
}

/// Puts threads of this process that were just spawned in the real-time FIFO class until the
/// guard drops ([`BoostedSpawned`]), if this process may; for a moment when only they stand
/// between a paused VM and its downtime's end (vCPU threads starting paused).
///
/// # Safety
///
/// Every handle must be of a thread of this process that is not joined or detached before
/// the guard drops (its `JoinHandle` is kept meanwhile).
pub unsafe fn boost_spawned(threads: &[libc::pthread_t]) -> Result<BoostedSpawned, PriorityError> {
    if !has_cap_sys_nice() && rlimit_rtprio() < u64::from(BOOST_PRIORITY.unsigned_abs()) {
        return Err(PriorityError::CannotBoost {
            needed: BOOST_PRIORITY,
        });
    }
    let mut boosted = BoostedSpawned {
        threads: Vec::new(),
    };
    for &t in threads {
        // SAFETY: the caller keeps `t` a live, unjoined thread of this process.
        unsafe {
            set_thread_policy(
                t,
                libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK,
                BOOST_PRIORITY,
            )
        }?;
        boosted.threads.push(t);
    }
    Ok(boosted)
}

impl Drop for BoostedSpawned {
    fn drop(&mut self) {
        for &t in &self.threads {
            // SAFETY: `boost_spawned`'s caller keeps every thread unjoined while this lives.
            if let Err(e) = unsafe { set_thread_policy(t, libc::SCHED_OTHER, 0) } {
                tracing::warn!("giving a thread its time-shared class back: {e}");
            }
        }
    }
}

/// Sets a thread's class by its pthread handle.
///
/// # Safety
///
/// `t` must be a thread of this process, not joined or detached.
unsafe fn set_thread_policy(
    t: libc::pthread_t,
    policy: i32,
    priority: i32,
) -> Result<(), PriorityError> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: the caller keeps `t` valid; pthread_setschedparam reads the one sched_param we
    // pass and changes only that thread's scheduling class.
    let rc = unsafe { libc::pthread_setschedparam(t, policy, &param) };
    if rc != 0 {
        return Err(PriorityError::SetSpawnedPolicy {
            policy,
            priority,
            source: io::Error::from_raw_os_error(rc),
        });
    }
    Ok(())
}

impl Boosted {
    /// What the threads run as while boosted.
    pub fn describe(&self) -> String {
        format!("real-time FIFO at priority {BOOST_PRIORITY}")
    }
}

impl Drop for Boosted {
    fn drop(&mut self) {
        for &tid in &self.tids {
            match set_policy(tid, libc::SCHED_OTHER, 0) {
                Ok(()) => {}
                Err(PriorityError::SetPolicy { source, .. })
                    if source.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => tracing::warn!("giving a thread its time-shared class back: {e}"),
            }
        }
    }
}

fn policy_of(tid: Tid) -> Result<i32, PriorityError> {
    // SAFETY: sched_getscheduler reads a thread's scheduling class and touches no memory.
    let p = unsafe { libc::sched_getscheduler(tid) };
    if p < 0 {
        return Err(PriorityError::Get {
            tid,
            source: io::Error::last_os_error(),
        });
    }
    // A class read back carries no reset-on-fork flag's meaning for the comparison.
    Ok(p & !libc::SCHED_RESET_ON_FORK)
}

fn set_policy(tid: Tid, policy: i32, priority: i32) -> Result<(), PriorityError> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: sched_setscheduler reads the one sched_param we pass and changes only the
    // thread's scheduling class.
    if unsafe { libc::sched_setscheduler(tid, policy, &param) } != 0 {
        return Err(PriorityError::SetPolicy {
            tid,
            priority,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn rlimit_rtprio() -> u64 {
    soft_limit(libc::RLIMIT_RTPRIO)
}

/// The calling thread's kernel id.
pub fn current_tid() -> Tid {
    // SAFETY: gettid has no memory effects and cannot fail.
    unsafe { libc::gettid() }
}

fn nice_of(tid: Tid) -> Result<i32, PriorityError> {
    // getpriority may return -1 as a value: only errno tells an error apart.
    // SAFETY: errno is this thread's own; clearing it before the call is how the man page
    // says to detect getpriority's errors.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: getpriority reads the scheduler's state of a thread and touches no memory.
    #[allow(clippy::cast_sign_loss)]
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
    let err = io::Error::last_os_error();
    if nice == -1 && err.raw_os_error().is_some_and(|e| e != 0) {
        return Err(PriorityError::Get { tid, source: err });
    }
    Ok(nice)
}

fn set_nice(tid: Tid, nice: i32) -> Result<(), PriorityError> {
    // SAFETY: setpriority changes a thread's nice value and touches no memory.
    #[allow(clippy::cast_sign_loss)]
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if r != 0 {
        return Err(PriorityError::Set {
            tid,
            nice,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Whether this process may set a thread to `nice` even after raising it: with CAP_SYS_NICE,
/// or when RLIMIT_NICE allows it.
fn may_set(nice: i32) -> bool {
    has_cap_sys_nice() || rlimit_nice() >= rlimit_for(nice)
}

/// The RLIMIT_NICE that allows lowering a thread to `nice` (the limit is 20 − nice).
fn rlimit_for(nice: i32) -> u64 {
    u64::try_from(20 - nice).unwrap_or(0)
}

fn rlimit_nice() -> u64 {
    soft_limit(libc::RLIMIT_NICE)
}

/// This process's soft limit of `resource` (0 when it cannot be read).
fn soft_limit(resource: libc::__rlimit_resource_t) -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    if unsafe { libc::getrlimit(resource, &mut r) } != 0 {
        return 0;
    }
    r.rlim_cur
}

fn has_cap_sys_nice() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| cap_eff(&s))
        .is_some_and(|caps| caps & (1 << CAP_SYS_NICE) != 0)
}

/// The effective capability set from /proc/self/status.
fn cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_effective_capabilities() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t0000000000800000\n";
        assert_eq!(cap_eff(status), Some(1 << CAP_SYS_NICE));
        assert_eq!(cap_eff("Name:\tx\n"), None);
    }

    #[test]
    fn rlimit_nice_counts_from_twenty() {
        assert_eq!(rlimit_for(0), 20);
        assert_eq!(rlimit_for(-20), 40);
        assert_eq!(rlimit_for(19), 1);
    }

    /// The calling thread goes first while boosted, and comes back to its class and nice
    /// value after; a thread it starts meanwhile is time-shared.
    #[test]
    fn boosts_and_gives_back() {
        std::thread::spawn(|| {
            let tid = current_tid();
            let nice = nice_of(tid).unwrap();
            match boost_current() {
                Ok(b) => {
                    assert_eq!(policy_of(tid).unwrap(), libc::SCHED_FIFO);
                    let child = std::thread::spawn(|| policy_of(current_tid()).unwrap());
                    assert_eq!(child.join().unwrap(), libc::SCHED_OTHER);
                    drop(b);
                    assert_eq!(policy_of(tid).unwrap(), libc::SCHED_OTHER);
                    assert_eq!(nice_of(tid).unwrap(), nice);
                }
                Err(PriorityError::CannotBoost { .. }) => {
                    println!("SKIPPED: this process may not use real-time priority");
                    assert_eq!(policy_of(tid).unwrap(), libc::SCHED_OTHER);
                }
                Err(e) => panic!("{e}"),
            }
        })
        .join()
        .unwrap();
    }

    /// A thread boosted as it starts runs in the real-time class until the guard drops, then
    /// time-shared again.
    #[test]
    fn a_thread_just_spawned_is_boosted_by_its_handle_and_given_back() {
        use std::os::unix::thread::JoinHandleExt;
        let (ask, asked) = std::sync::mpsc::channel::<()>();
        let (tell, told) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            while asked.recv().is_ok() {
                let _ = tell.send(policy_of(current_tid()).unwrap());
            }
        });
        let policy = |ask: &std::sync::mpsc::Sender<()>| {
            ask.send(()).unwrap();
            told.recv().unwrap()
        };
        // SAFETY: `t` is joined only after the guard dropped.
        match unsafe { boost_spawned(&[t.as_pthread_t()]) } {
            Ok(b) => {
                assert_eq!(policy(&ask), libc::SCHED_FIFO);
                drop(b);
                assert_eq!(policy(&ask), libc::SCHED_OTHER);
            }
            Err(PriorityError::CannotBoost { .. }) => {
                println!("SKIPPED: this process may not use real-time priority");
                assert_eq!(policy(&ask), libc::SCHED_OTHER);
            }
            Err(e) => panic!("{e}"),
        }
        drop(ask);
        t.join().unwrap();
    }

    /// A thread of this process that waits until stopped.
    struct Parked {
        tid: Tid,
        stop: std::sync::mpsc::Sender<()>,
        thread: std::thread::JoinHandle<()>,
    }

    impl Parked {
        fn start() -> Self {
            let (tx, rx) = std::sync::mpsc::channel();
            let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
            let thread = std::thread::spawn(move || {
                tx.send(current_tid()).unwrap();
                let _ = stop_rx.recv();
            });
            let tid = rx.recv().unwrap();
            Parked { tid, stop, thread }
        }

        fn stop(self) {
            self.stop.send(()).unwrap();
            self.thread.join().unwrap();
        }
    }

    /// Other threads of this process go first while boosted, and come back after.
    #[test]
    fn boosts_other_threads_and_gives_them_back() {
        let parked = Parked::start();
        let tid = parked.tid;
        match boost(&[tid]) {
            Ok(b) => {
                assert_eq!(policy_of(tid).unwrap(), libc::SCHED_FIFO);
                drop(b);
                assert_eq!(policy_of(tid).unwrap(), libc::SCHED_OTHER);
            }
            Err(PriorityError::CannotBoost { .. }) => {
                println!("SKIPPED: this process may not use real-time priority");
            }
            Err(e) => panic!("{e}"),
        }
        parked.stop();
    }

    /// A thread's nice value goes up and comes back, whether restored or dropped.
    #[test]
    fn lowers_and_gives_back() {
        let parked = Parked::start();
        let tid = parked.tid;
        let before = nice_of(tid).unwrap();
        match lower(&[tid], 5) {
            Ok(l) => {
                assert_eq!(nice_of(tid).unwrap(), (before + 5).min(NICE_MAX));
                l.restore();
                assert_eq!(nice_of(tid).unwrap(), before);
                drop(lower(&[tid], 5).unwrap());
                assert_eq!(nice_of(tid).unwrap(), before);
            }
            // Without the right to lower it again, nothing is changed.
            Err(PriorityError::CannotRestore { .. }) => assert_eq!(nice_of(tid).unwrap(), before),
            Err(e) => panic!("{e}"),
        }
        parked.stop();
    }
}
