//! Page streams (multichannel): one thread per extra connection, each writing the batches it
//! is handed from its own queue. Which stream takes a batch is [`policy::pick_stream`]'s
//! decision; every stream carries every round's end marker.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;

use ram::GuestRam;
use transport::{Connection, ShutdownHandle};

use super::link::{Link, Outgoing};
use crate::policy;
use crate::protocol::{Kind, RoundEnd};
use crate::{thread_cpu_seconds, MigrationError};

enum Msg {
    Batch(Outgoing),
    RoundEnd(RoundEnd),
    Done,
}

/// One page stream: a thread writing frames from its own queue to its own connection.
struct Channel {
    index: usize,
    peer: String,
    tx: Option<SyncSender<Msg>>,
    /// Bytes handed over and not yet written to the socket (round ends count one).
    queued: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<Result<Finished, MigrationError>>>,
    shutdown: ShutdownHandle,
}

impl Channel {
    fn start(
        index: usize,
        conn: Connection,
        ram: Arc<GuestRam>,
        timeout: std::time::Duration,
    ) -> Result<Self, MigrationError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Msg>(4);
        let queued = Arc::new(AtomicUsize::new(0));
        let q = queued.clone();
        let peer = conn.peer.to_string();
        let shutdown = conn
            .shutdown_handle()
            .map_err(MigrationError::socket("cloning a page stream's socket"))?;
        let thread = std::thread::Builder::new()
            .name(format!("stream{index}"))
            .spawn(move || {
                // The whole connection lives here: the link borrows its parts.
                let mut conn = conn;
                let cpu0 = thread_cpu_seconds();
                let (mut link, _) = Link::new(conn.split(), 0, timeout);
                for msg in rx {
                    match msg {
                        Msg::Batch(b) => {
                            let n = b.queued_len();
                            link.send(&ram, b)?;
                            q.fetch_sub(n, Ordering::Relaxed);
                        }
                        Msg::RoundEnd(r) => {
                            link.out.send_round_end(r)?;
                            link.out.flush()?;
                            q.fetch_sub(1, Ordering::Relaxed);
                        }
                        Msg::Done => {
                            link.out.send(Kind::Done, &[])?;
                            link.out.flush()?;
                            link.finish()?;
                            break;
                        }
                    }
                }
                Ok(Finished {
                    cpu_seconds: thread_cpu_seconds() - cpu0,
                    direct_mechanism: link.direct_mechanism(),
                })
            })
            .map_err(|source| MigrationError::Thread {
                what: "page stream",
                source,
            })?;
        Ok(Channel {
            index,
            peer,
            tx: Some(tx),
            queued,
            thread: Some(thread),
            shutdown,
        })
    }

    fn send(&mut self, msg: Msg) -> Result<(), MigrationError> {
        let sent = self.tx.as_ref().map(|tx| tx.send(msg).is_ok());
        match sent {
            Some(true) => Ok(()),
            _ => Err(self.failure()),
        }
    }

    /// Why the stream stopped, from its thread, naming the stream.
    fn failure(&mut self) -> MigrationError {
        let cause = match self.join() {
            Err(e) => e,
            Ok(_) => MigrationError::StoppedEarly,
        };
        MigrationError::Stream {
            index: self.index,
            peer: self.peer.clone(),
            cause: Box::new(cause),
        }
    }

    /// Waits for the stream's thread: what it used, or its error.
    fn join(&mut self) -> Result<Finished, MigrationError> {
        self.tx = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(MigrationError::StreamFailed),
            None => Ok(Finished::default()),
        }
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        // On failure the thread may be blocked writing to a dead peer: unblock it.
        if self.thread.is_some() {
            self.shutdown.shutdown();
            let _ = self.join();
        }
    }
}

/// What a stream's thread reports when it ends.
#[derive(Default)]
struct Finished {
    cpu_seconds: f64,
    /// How its direct batches went out (the kernel may have copied zero-copy sends).
    direct_mechanism: &'static str,
}

/// The page streams of one migration; empty when pages travel on the control connection.
#[derive(Default)]
pub(super) struct Streams {
    channels: Vec<Channel>,
    /// CPU seconds of the stream threads that finished.
    pub cpu_seconds: f64,
    /// How the first stream sent its direct batches, once the streams finished.
    pub direct_mechanism: Option<&'static str>,
    /// Streams started, finished or not.
    pub started: usize,
}

impl Streams {
    pub fn start(
        conns: Vec<Connection>,
        ram: &Arc<GuestRam>,
        timeout: std::time::Duration,
    ) -> Result<Self, MigrationError> {
        let channels: Vec<Channel> = conns
            .into_iter()
            .enumerate()
            .map(|(i, c)| Channel::start(i, c, ram.clone(), timeout))
            .collect::<Result<_, _>>()?;
        Ok(Streams {
            started: channels.len(),
            channels,
            ..Streams::default()
        })
    }

    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    /// Queues a batch on the stream the policy picks.
    pub fn send(&mut self, b: Outgoing) -> Result<(), MigrationError> {
        let loads: Vec<usize> = self
            .channels
            .iter()
            .map(|c| c.queued.load(Ordering::Relaxed))
            .collect();
        let Some(i) = policy::pick_stream(&loads) else {
            return Err(MigrationError::StreamFailed);
        };
        let ch = &mut self.channels[i];
        ch.queued.fetch_add(b.queued_len(), Ordering::Relaxed);
        ch.send(Msg::Batch(b))
    }

    /// Every stream carries the round's end, so the destination's streams meet there.
    pub fn round_end(&mut self, r: RoundEnd) -> Result<(), MigrationError> {
        for ch in &mut self.channels {
            // Counted as queued until the stream has flushed it (see `pending`).
            ch.queued.fetch_add(1, Ordering::Relaxed);
            ch.send(Msg::RoundEnd(r))?;
        }
        Ok(())
    }

    /// Bytes handed to the streams that the peer has not acknowledged yet, and of those, how
    /// many still wait in our queues.
    pub fn pending(&self) -> Result<(usize, usize), MigrationError> {
        let (mut unacked, mut waiting) = (0, 0);
        for ch in &self.channels {
            let q = ch.queued.load(Ordering::Relaxed);
            waiting += q;
            unacked += q + ch
                .shutdown
                .unacked()
                .map_err(MigrationError::socket("SIOCOUTQ"))?;
        }
        Ok((unacked, waiting))
    }

    /// Ends every stream and waits until each has written all it was given.
    pub fn finish(&mut self) -> Result<(), MigrationError> {
        for ch in &mut self.channels {
            ch.send(Msg::Done)?;
        }
        for ch in &mut self.channels {
            let f = ch.join().map_err(|e| MigrationError::Stream {
                index: ch.index,
                peer: ch.peer.clone(),
                cause: Box::new(e),
            })?;
            self.cpu_seconds += f.cpu_seconds;
            self.direct_mechanism.get_or_insert(f.direct_mechanism);
        }
        self.channels.clear();
        Ok(())
    }
}
