//! The destination side: an explicit receive state machine that builds the VM, places pages
//! at their final address, and resumes only once it holds everything.
use std::io::Write;
use std::time::{Duration, Instant};

use transport::Connection;
use vmm::memory::PAGE_SIZE;
use vmm::{Console, PreparedVm, Vm, VmConfig, VmState};

use crate::codec;
use crate::protocol::{
    self, decode_pages, FrameReader, FrameWriter, Kind, ProtocolError, Transport,
};
use crate::{thread_cpu_seconds, MigrationError, VerifyOutcome};

/// Largest VM we agree to build for a peer.
pub const MAX_MEMORY: u64 = 1 << 40;

#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    pub console: Console,
    /// A peer silent for this long is taken for dead.
    pub peer_timeout: Duration,
    /// How long the guest gets to verify its memory after resume.
    pub verify_timeout: Duration,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            console: Console::Discard,
            peer_timeout: Duration::from_secs(60),
            verify_timeout: Duration::from_secs(60),
        }
    }
}

enum RecvState {
    AwaitConfig,
    Receiving { vm: PreparedVm },
    AwaitDone { vm: PreparedVm, state: Box<VmState> },
}

impl RecvState {
    fn name(&self) -> &'static str {
        match self {
            RecvState::AwaitConfig => "waiting for the VM config",
            RecvState::Receiving { .. } => "receiving memory",
            RecvState::AwaitDone { .. } => "waiting for the end of the stream",
        }
    }
}

/// What the destination saw.
#[derive(Clone, Debug, Default)]
pub struct ReceiveStats {
    pub pages: u64,
    pub zero_pages: u64,
    pub rounds: u32,
}

fn check_config(c: &VmConfig) -> Result<(), ProtocolError> {
    if c.memory == 0 || c.memory > MAX_MEMORY || c.vcpus == 0 || c.vcpus > vmm::vm::MAX_VCPUS {
        return Err(ProtocolError::Malformed {
            kind: Kind::Config,
            why: format!("unreasonable VM: {} bytes, {} vCPUs", c.memory, c.vcpus),
        });
    }
    Ok(())
}

/// Receives one VM over `conn`. Returns it running; on any error nothing is left behind.
pub fn receive(
    mut conn: Connection,
    opts: &ReceiveOptions,
) -> Result<(Vm, ReceiveStats), MigrationError> {
    conn.set_read_timeout(Some(opts.peer_timeout))?;
    let cpu0 = thread_cpu_seconds();
    let result = run(&mut conn, opts, cpu0);
    if let Err(e) = &result {
        // Best effort: tell the source why, so it can say so too.
        if !matches!(e, MigrationError::Protocol(ProtocolError::PeerAborted(_))) {
            let mut w = FrameWriter::new(&mut conn.writer);
            let _ = w.send(Kind::Abort, e.to_string().as_bytes());
            let _ = w.flush();
        }
        conn.shutdown();
    }
    result
}

fn run(
    conn: &mut Connection,
    opts: &ReceiveOptions,
    cpu0: f64,
) -> Result<(Vm, ReceiveStats), MigrationError> {
    let hello = protocol::accept_hello(&mut conn.reader, &mut conn.writer)?;
    let mut scratch = Vec::new();
    let mut input = FrameReader::new(&mut conn.reader);
    let mut out = FrameWriter::new(&mut conn.writer);
    let mut stats = ReceiveStats::default();
    let mut st = RecvState::AwaitConfig;
    loop {
        let (kind, payload) = input.recv()?;
        st = match (st, kind) {
            (RecvState::AwaitConfig, Kind::Config) => {
                let config: VmConfig =
                    serde_json::from_slice(payload).map_err(|e| ProtocolError::Malformed {
                        kind,
                        why: e.to_string(),
                    })?;
                check_config(&config)?;
                let vm = PreparedVm::new(&config)?;
                out.send(Kind::Ready, &[])?;
                out.flush()?;
                RecvState::Receiving { vm }
            }
            (RecvState::Receiving { vm }, Kind::Pages) => {
                place(vm.ram(), decode_pages(payload, vm.ram().size)?, &mut stats)?;
                RecvState::Receiving { vm }
            }
            (RecvState::Receiving { vm }, Kind::PagesCompressed)
                if hello.transport == Transport::Compressed =>
            {
                let b = protocol::split_compressed(payload)?;
                codec::decompress(b.codec, b.data, b.raw_len, &mut scratch)?;
                let pages = protocol::decode_batch(b.head, &scratch, vm.ram().size, kind)?;
                place(vm.ram(), pages, &mut stats)?;
                RecvState::Receiving { vm }
            }
            (RecvState::Receiving { vm }, Kind::RoundEnd) => {
                if payload.len() != 12 {
                    return Err(ProtocolError::Malformed {
                        kind,
                        why: format!("{} bytes, expected 12", payload.len()),
                    }
                    .into());
                }
                stats.rounds += 1;
                RecvState::Receiving { vm }
            }
            (RecvState::Receiving { vm }, Kind::State) => {
                let state = VmState::from_bytes(payload).map_err(|e| ProtocolError::Malformed {
                    kind,
                    why: e.to_string(),
                })?;
                if state.config.memory != vm.ram().size {
                    return Err(ProtocolError::Malformed {
                        kind,
                        why: format!(
                            "state is for {} bytes of RAM, the VM has {}",
                            state.config.memory,
                            vm.ram().size
                        ),
                    }
                    .into());
                }
                RecvState::AwaitDone {
                    vm,
                    state: Box::new(state),
                }
            }
            (RecvState::AwaitDone { vm, state }, Kind::Done) => {
                // Everything is here: load the state paused, confirm, then run.
                let mut vm = vm.finish(&state, &opts.console, true)?;
                out.send(Kind::Confirm, &[])?;
                out.flush()?;
                vm.resume()?;
                let t = Instant::now();
                let outcome = verify(&vm, opts.verify_timeout);
                tracing::info!(
                    "guest verify on the destination took {:?}: {}",
                    t.elapsed(),
                    outcome.detail
                );
                let outcome = VerifyOutcome {
                    cpu_seconds: thread_cpu_seconds() - cpu0,
                    ..outcome
                };
                out.send(Kind::Verified, &serde_json::to_vec(&outcome)?)?;
                out.flush()?;
                let _ = out.inner().flush();
                return Ok((vm, stats));
            }
            (s, k) => {
                return Err(ProtocolError::Unexpected {
                    kind: k,
                    state: s.name(),
                }
                .into())
            }
        };
    }
}

/// Puts a batch's pages at their final place: runs of consecutive pages of one kind in one
/// call, data through the memfd (no pre-zeroing of fresh pages), zero pages as holes.
fn place(
    ram: &vmm::memory::GuestRam,
    pages: Vec<protocol::PageRef<'_>>,
    stats: &mut ReceiveStats,
) -> std::io::Result<()> {
    let mut i = 0;
    while i < pages.len() {
        let zero = pages[i].data.is_none();
        let mut j = i + 1;
        let adjacent = |a: &protocol::PageRef<'_>, b: &protocol::PageRef<'_>| match (a.data, b.data)
        {
            (None, None) => true,
            (Some(x), Some(y)) => y.as_ptr() as usize == x.as_ptr() as usize + PAGE_SIZE as usize,
            _ => false,
        };
        while j < pages.len()
            && adjacent(&pages[j - 1], &pages[j])
            && pages[j].offset == pages[j - 1].offset + PAGE_SIZE
        {
            j += 1;
        }
        let off = pages[i].offset;
        if zero {
            ram.zero_range(off, (j - i) as u64 * PAGE_SIZE)?;
            stats.zero_pages += (j - i) as u64;
        } else if j - i == 1 {
            ram.write_at(off, pages[i].data.expect("a data page"))?;
        } else {
            // Consecutive data pages that sit back to back in the batch go in one write.
            let first = pages[i].data.expect("a data run").as_ptr();
            // SAFETY: `adjacent` checked that each of pages i..j starts right where the previous
            // PAGE_SIZE slice ends, so the run is one contiguous range of the same live buffer.
            let run = unsafe { std::slice::from_raw_parts(first, (j - i) * PAGE_SIZE as usize) };
            ram.write_at(off, run)?;
        }
        stats.pages += (j - i) as u64;
        i = j;
    }
    Ok(())
}

fn verify(vm: &Vm, timeout: Duration) -> VerifyOutcome {
    let st = &vm.io().status;
    if st.report().ready_pages.is_none() {
        return VerifyOutcome {
            ok: false,
            detail: "not verifiable: the guest is not the livemig workload guest".into(),
            cpu_seconds: 0.0,
        };
    }
    let before = st.report().verify_count;
    st.request_verify();
    match st
        .wait_for(timeout, |r| r.verify_count > before)
        .and_then(|r| r.last_verify)
    {
        Some(vmm::devices::VerifyResult::Ok { pages }) => VerifyOutcome {
            ok: true,
            detail: format!("VERIFY OK pages={pages}"),
            cpu_seconds: 0.0,
        },
        Some(vmm::devices::VerifyResult::Bad { first_bad_addr }) => VerifyOutcome {
            ok: false,
            detail: format!("VERIFY FAIL first bad address {first_bad_addr:#x}"),
            cpu_seconds: 0.0,
        },
        None => VerifyOutcome {
            ok: false,
            detail: format!("no verify result within {timeout:?} (not our workload guest?)"),
            cpu_seconds: 0.0,
        },
    }
}
