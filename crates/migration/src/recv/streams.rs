//! The destination's page streams: one thread each, meeting the others at every round end.
use std::sync::{Condvar, Mutex};

use transport::Connection;

use super::place::{place, place_direct, Dest};
use super::{ReceiveStats, Step, StreamState};
use crate::policy::Landing;
use crate::protocol::{FrameReader, Transport};
use crate::{thread_cpu_seconds, MigrationError};

/// A barrier for the page streams' round markers that a failing stream can break, so no
/// thread waits forever for a peer that died.
pub(super) struct RoundBarrier {
    n: usize,
    state: Mutex<BarrierState>,
    cv: Condvar,
}

#[derive(Default)]
struct BarrierState {
    /// Streams at the current round's end.
    waiting: usize,
    /// Rounds all streams completed.
    generation: u64,
    aborted: bool,
    /// Streams that delivered their Done.
    finished: usize,
}

impl RoundBarrier {
    pub fn new(n: usize) -> Self {
        RoundBarrier {
            n,
            state: Mutex::new(BarrierState::default()),
            cv: Condvar::new(),
        }
    }

    /// A stream reached the round's end: waits for the others.
    pub fn wait(&self) -> Result<(), MigrationError> {
        let mut g = locks::lock(&self.state);
        if g.aborted {
            return Err(MigrationError::StreamFailed);
        }
        g.waiting += 1;
        if g.waiting == self.n {
            g.waiting = 0;
            g.generation += 1;
            self.cv.notify_all();
            return Ok(());
        }
        let gen = g.generation;
        while g.generation == gen && !g.aborted {
            g = locks::wait(&self.cv, g);
        }
        if g.aborted {
            Err(MigrationError::StreamFailed)
        } else {
            Ok(())
        }
    }

    /// Waits until the streams completed `rounds` rounds, or delivered their Done (the last
    /// round goes on the control connection alone); at once without streams.
    pub fn wait_rounds(&self, rounds: u64) -> Result<(), MigrationError> {
        let mut g = locks::lock(&self.state);
        while self.n > 0 && g.generation < rounds && g.finished < self.n && !g.aborted {
            g = locks::wait(&self.cv, g);
        }
        if g.aborted {
            Err(MigrationError::StreamFailed)
        } else {
            Ok(())
        }
    }

    /// A stream delivered its Done.
    pub fn finished(&self) {
        locks::lock(&self.state).finished += 1;
        self.cv.notify_all();
    }

    /// Waits until every stream delivered its Done (the control connection's pages come after).
    pub fn wait_all_finished(&self) -> Result<(), MigrationError> {
        let mut g = locks::lock(&self.state);
        while g.finished < self.n && !g.aborted {
            g = locks::wait(&self.cv, g);
        }
        if g.aborted {
            Err(MigrationError::StreamFailed)
        } else {
            Ok(())
        }
    }

    pub fn abort(&self) {
        locks::lock(&self.state).aborted = true;
        self.cv.notify_all();
    }
}

/// Page stream `index`: pages until Done, meeting the other streams at every round end. An
/// error names the stream and its peer.
pub(super) fn page_stream(
    index: usize,
    mut conn: Connection,
    dst: Dest<'_>,
    barrier: &RoundBarrier,
    transport: Transport,
    landing: Landing,
) -> Result<ReceiveStats, MigrationError> {
    let peer = conn.peer.to_string();
    let cpu0 = thread_cpu_seconds();
    let mut input = FrameReader::new(&mut conn.reader);
    let mut stats = ReceiveStats::default();
    let mut scratch = Vec::new();
    let mut state = StreamState::Receiving;
    let r = (|| {
        while state != StreamState::Finished {
            let (next, step) = state.next(input.next_frame()?)?;
            state = next;
            match step {
                // No stream applies round k+1 before every stream applied round k.
                Step::RoundEnd(_) => {
                    dst.round_end();
                    barrier.wait()?
                }
                Step::Direct(entries) => {
                    place_direct(&mut input, &entries, dst.ram, landing, &mut stats)?
                }
                step => place(step, dst, transport, &mut scratch, &mut stats)?,
            }
        }
        barrier.finished();
        Ok(())
    })();
    stats.stream_cpu_seconds = thread_cpu_seconds() - cpu0;
    match r {
        Ok(()) => Ok(stats),
        // Another stream (or the control connection) failed first and said why.
        Err(MigrationError::StreamFailed) => Err(MigrationError::StreamFailed),
        Err(e) => Err(MigrationError::Stream {
            index,
            peer,
            cause: Box::new(e),
        }),
    }
}
