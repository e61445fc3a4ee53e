//! A device's I/O thread: it waits (epoll) on its queues' notifications, on the fds its
//! worker reads (a tap), and on a stop event; when told to stop, the worker completes and
//! flushes what is in flight first, and the thread hands the worker and its queues back.
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use ram::{DmaMemory, GuestRam};
use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::Interrupt;

/// Why a worker stopped serving its queues.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum WorkerError {
    /// the guest's queue {queue}: {source}
    Queue {
        queue: usize,
        source: virtio_queue::Error,
    },
    /// the backend: {0}
    Backend(std::io::Error),
    /// waiting for events: {0}
    Epoll(std::io::Error),
    /// guest memory: {0}
    Memory(ram::MemoryError),
}

/// What a worker works with on each event.
pub struct Ctx<'a> {
    pub queues: &'a mut [Queue],
    pub mem: &'a DmaMemory,
    pub irq: &'a Interrupt,
    /// Whether the worker wants to hear of each of its fds (a tap is not read while the
    /// guest has no buffer for what it would bring).
    pub fd_wanted: &'a mut [bool],
}

/// A device's I/O, run on the device's thread.
pub trait Worker: Send + 'static {
    /// Fds besides the queues whose readability this worker handles.
    fn fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// Queue `q` was notified (and once for every queue when the thread starts, for what
    /// was made available while it did not run).
    fn queue_notified(&mut self, q: usize, cx: &mut Ctx) -> Result<(), WorkerError>;
    /// Fd `i` of [`Self::fds`] is readable.
    fn fd_ready(&mut self, _i: usize, _cx: &mut Ctx) -> Result<(), WorkerError> {
        Ok(())
    }
    /// The thread is stopping: complete what is in flight and make it durable.
    fn drain_and_flush(&mut self, cx: &mut Ctx) -> Result<(), WorkerError>;
}

const STOP: u64 = u64::MAX;
const FD_BASE: u64 = 1 << 32;

/// What a stopped thread hands back.
pub(crate) struct Stopped<W> {
    pub worker: W,
    pub queues: Vec<Queue>,
    /// Why it stopped serving early, if it did.
    pub failure: Option<WorkerError>,
}

pub(crate) struct Running<W> {
    stop: EventFd,
    thread: JoinHandle<Stopped<W>>,
}

pub(crate) struct Spawn<W> {
    pub name: String,
    pub worker: W,
    pub queues: Vec<Queue>,
    pub ram: Arc<GuestRam>,
    pub irq: Interrupt,
    pub queue_events: Vec<Arc<EventFd>>,
}

impl<W: Worker> Running<W> {
    pub fn spawn(s: Spawn<W>) -> std::io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop2 = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name(s.name.clone())
            .spawn(move || serve(s, stop2))?;
        Ok(Running { stop, thread })
    }

    /// Stops the thread, its worker draining first; None if the thread panicked.
    pub fn stop(self) -> Option<Stopped<W>> {
        let _ = self.stop.write(1);
        self.thread.join().ok()
    }
}

fn serve<W: Worker>(s: Spawn<W>, stop: EventFd) -> Stopped<W> {
    let Spawn {
        name,
        mut worker,
        mut queues,
        ram,
        irq,
        queue_events,
    } = s;
    let failure = match ram.dma() {
        Ok(mem) => event_loop(&mut worker, &mut queues, mem, &irq, &queue_events, &stop).err(),
        Err(e) => Some(WorkerError::Memory(e)),
    };
    if let Some(e) = &failure {
        tracing::error!("{name}: the device stopped serving its queues: {e}");
    }
    Stopped {
        worker,
        queues,
        failure,
    }
}

fn event_loop<W: Worker>(
    worker: &mut W,
    queues: &mut [Queue],
    mem: &DmaMemory,
    irq: &Interrupt,
    queue_events: &[Arc<EventFd>],
    stop: &EventFd,
) -> Result<(), WorkerError> {
    let fds = worker.fds();
    let mut wanted = vec![true; fds.len()];
    let mut watched = wanted.clone();
    let epoll = Epoll::new().map_err(WorkerError::Epoll)?;
    let add = |fd: RawFd, token: u64| {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(WorkerError::Epoll)
    };
    add(stop.as_raw_fd(), STOP)?;
    for (q, e) in queue_events.iter().enumerate() {
        add(e.as_raw_fd(), q as u64)?;
    }
    for (i, fd) in fds.iter().enumerate() {
        add(*fd, FD_BASE + i as u64)?;
    }
    let mut cx = Ctx {
        queues,
        mem,
        irq,
        fd_wanted: &mut wanted,
    };
    for q in 0..queue_events.len() {
        worker.queue_notified(q, &mut cx)?;
    }
    let mut events = vec![EpollEvent::default(); 16];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(WorkerError::Epoll(e)),
        };
        for ev in &events[..n] {
            match ev.data() {
                STOP => {
                    return worker.drain_and_flush(&mut cx);
                }
                t if t >= FD_BASE => worker.fd_ready((t - FD_BASE) as usize, &mut cx)?,
                q => {
                    let q = q as usize;
                    let _ = queue_events[q].read();
                    worker.queue_notified(q, &mut cx)?;
                }
            }
        }
        for (i, fd) in fds.iter().enumerate() {
            if cx.fd_wanted[i] != watched[i] {
                let op = if cx.fd_wanted[i] {
                    ControlOperation::Add
                } else {
                    ControlOperation::Delete
                };
                epoll
                    .ctl(op, *fd, EpollEvent::new(EventSet::IN, FD_BASE + i as u64))
                    .map_err(WorkerError::Epoll)?;
                watched[i] = cx.fd_wanted[i];
            }
        }
    }
}
