//! Compression workers for the `compressed` page path, pipelined with sending: the sender
//! copies pages and writes frames while workers compress the batches in flight. Which codec,
//! or none, is the [`CodecPolicy`]'s decision; this only carries it out and measures.
use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::codec::{self, Choice, CodecPolicy};
use crate::report::CompressionReport;
use crate::{thread_cpu_seconds, MigrationError};

/// A batch on its way through a worker.
pub(super) struct Job {
    /// The batch's id (see `PageSender::written`).
    pub id: u64,
    pub head: Vec<u8>,
    pub data: Vec<u8>,
    /// Whole pages in `data` (deltas are counted apart).
    pub pages: u64,
    pub out: Vec<u8>,
    pub choice: Choice,
    pub secs: f64,
}

pub(super) struct Compressor {
    pub policy: CodecPolicy,
    /// Raw while set, whatever the policy says ([`crate::MigrateOptions::hold_raw`]).
    hold_raw: Arc<std::sync::atomic::AtomicBool>,
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Job>,
    workers: Vec<std::thread::JoinHandle<f64>>,
    in_flight: usize,
    max_in_flight: usize,
    /// Batches compressed on the sending thread, in order ([`Self::compress_here`]).
    ready: VecDeque<Job>,
    here: bool,
    pub stats: CompressionReport,
}

impl Compressor {
    /// The next batch's codec: the policy's, unless the migration is held raw.
    pub fn choose(&mut self) -> Choice {
        if self.held_raw() {
            self.stats.batches_held_raw += 1;
            return Choice::Raw;
        }
        self.policy.choose()
    }

    /// Whether the migration is held raw now.
    pub fn held_raw(&self) -> bool {
        self.hold_raw.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// One worker per core; `cap`: the migration's bandwidth cap in bits/s, if any.
    pub fn start(
        cap: Option<u64>,
        hold_raw: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<Self, MigrationError> {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (jtx, jrx) = sync_channel::<Job>(2 * n);
        let (dtx, drx) = std::sync::mpsc::channel::<Job>();
        let jrx = Arc::new(Mutex::new(jrx));
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let (jrx, dtx) = (jrx.clone(), dtx.clone());
            let w = std::thread::Builder::new()
                .name(format!("compress{i}"))
                .spawn(move || work(&jrx, &dtx))
                .map_err(|source| MigrationError::Thread {
                    what: "compression worker",
                    source,
                })?;
            workers.push(w);
        }
        Ok(Compressor {
            policy: CodecPolicy::new(n).with_cap(cap.map(|bps| bps as f64 / 8.0)),
            hold_raw,
            jobs: Some(jtx),
            done: drx,
            workers,
            in_flight: 0,
            max_in_flight: 2 * n,
            ready: VecDeque::new(),
            here: false,
            stats: CompressionReport::default(),
        })
    }

    /// From now on, batches are compressed on the sending thread: while the VM is paused
    /// that thread goes first, and the workers would wait behind every guest and other
    /// migration on a busy host. Call it with no batch in flight.
    pub fn compress_here(&mut self) {
        self.here = true;
    }

    /// Hands a batch to the workers (or compresses it now, [`Self::compress_here`]).
    pub fn submit(&mut self, mut job: Job) -> Result<(), MigrationError> {
        if self.here {
            encode(&mut job);
            self.ready.push_back(job);
            return Ok(());
        }
        let gone = || MigrationError::Thread {
            what: "compression worker",
            source: std::io::Error::other("the workers are gone"),
        };
        self.jobs
            .as_ref()
            .ok_or_else(gone)?
            .send(job)
            .map_err(|_| gone())?;
        self.in_flight += 1;
        Ok(())
    }

    /// A finished batch: waiting for one when `wait` (or when the pipeline is full), else
    /// only if one is ready.
    pub fn finished(&mut self, wait: bool) -> Result<Option<Job>, MigrationError> {
        if let Some(job) = self.ready.pop_front() {
            return Ok(Some(job));
        }
        if self.in_flight == 0 {
            return Ok(None);
        }
        let job = if wait || self.in_flight >= self.max_in_flight {
            self.done
                .recv()
                .map(Some)
                .map_err(|_| MigrationError::Thread {
                    what: "compression worker",
                    source: std::io::Error::other("the workers are gone"),
                })?
        } else {
            self.done.try_recv().ok()
        };
        if job.is_some() {
            self.in_flight -= 1;
        }
        Ok(job)
    }

    /// Stops the workers; returns their CPU seconds.
    pub fn finish(&mut self) -> f64 {
        self.jobs = None;
        self.workers.drain(..).filter_map(|w| w.join().ok()).sum()
    }

    /// The report of what was compressed, with the workers' CPU.
    pub fn report(&mut self) -> CompressionReport {
        let mut r = self.stats.clone();
        r.codec_cpu_seconds = self.finish();
        r.ratio = if r.raw_bytes > 0 {
            r.compressed_bytes as f64 / r.raw_bytes as f64
        } else {
            1.0
        };
        r
    }
}

impl Drop for Compressor {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A worker: compresses jobs until the queue closes; returns its CPU seconds.
fn work(jobs: &Mutex<std::sync::mpsc::Receiver<Job>>, done: &std::sync::mpsc::Sender<Job>) -> f64 {
    let cpu0 = thread_cpu_seconds();
    loop {
        let job = locks::lock(jobs).recv();
        let Ok(mut job) = job else { break };
        encode(&mut job);
        if done.send(job).is_err() {
            break;
        }
    }
    thread_cpu_seconds() - cpu0
}

/// Compresses a job's batch with its codec (raw if that fails), timed.
fn encode(job: &mut Job) {
    if let Choice::Compress(c) = job.choice {
        let t = Instant::now();
        if codec::compress(c, &job.data, &mut job.out).is_err() {
            job.choice = Choice::Raw;
        }
        job.secs = t.elapsed().as_secs_f64();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Codec;

    fn job(id: u64, data: Vec<u8>) -> Job {
        Job {
            id,
            head: Vec::new(),
            data,
            pages: 1,
            out: Vec::new(),
            choice: Choice::Compress(Codec::Lz4),
            secs: 0.0,
        }
    }

    /// Once the VM is paused, a batch is compressed before `submit` returns, on the calling
    /// thread, and comes back in order without waiting for a worker.
    #[test]
    fn while_paused_batches_are_compressed_on_the_sending_thread_in_order() {
        let mut c = Compressor::start(None, Arc::default()).unwrap();
        c.compress_here();
        let pages: Vec<Vec<u8>> = (0..3u8).map(|b| vec![b; 4096]).collect();
        for (id, p) in pages.iter().enumerate() {
            c.submit(job(id as u64, p.clone())).unwrap();
        }
        assert_eq!(c.in_flight, 0, "nothing went to the workers");
        for (id, p) in pages.iter().enumerate() {
            let j = c.finished(false).unwrap().expect("compressed already");
            assert_eq!(j.id, id as u64);
            assert!(j.out.len() < p.len());
            let mut back = Vec::new();
            codec::decompress(Codec::Lz4, &j.out, p.len(), &mut back).unwrap();
            assert_eq!(&back, p);
        }
        assert!(c.finished(true).unwrap().is_none());
    }
}
