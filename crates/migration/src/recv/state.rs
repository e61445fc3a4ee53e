//! The destination's state machines, as Cloud Hypervisor's `ReceiveMigrationState`: one enum
//! per connection kind and one transition function each. They are pure: a frame in, the next
//! state and the [`Step`] the mechanism must carry out; anything unexpected is an error that
//! names the state and the frame.
use migratable::{Snapshot, VmConfig};

use crate::protocol::{
    BatchHead, CompressedBatch, DiskBlocks, Entry, Frame, Kind, Owed, Prepare, ProtocolError,
    RoundEnd,
};

/// Where an incoming migration is, on its control connection.
#[derive(Debug)]
pub enum ReceiveMigrationState {
    /// The handshake is done; the source's Config comes next.
    AwaitingConfig,
    /// The VM is built and Ready was sent; the extents the copy will send come first (the
    /// source scans for them while the VM is built here).
    AwaitingExtents { vm: VmConfig },
    /// The VM is built and Ready was sent; memory arrives in rounds.
    ReceivingMemory { vm: VmConfig, rounds: u32 },
    /// Post-copy ahead: the running source named pages it has written since it sent them;
    /// they are dropped here, and the paused source names the rest next.
    OwedAhead {
        vm: VmConfig,
        rounds: u32,
        owed: Box<Owed>,
    },
    /// Post-copy: the paused source named the pages it still owes; its state comes next.
    OwedReceived { rounds: u32, owed: Box<Owed> },
    /// The paused source's device state is here; only Done may follow.
    StateReceived {
        rounds: u32,
        state: Box<Snapshot>,
        owed: Option<Box<Owed>>,
    },
    /// Everything is here (or, in post-copy, all but the owed pages): the VM can be loaded,
    /// confirmed and resumed.
    Complete {
        rounds: u32,
        state: Box<Snapshot>,
        owed: Option<Box<Owed>>,
    },
}

/// What the mechanism does for an accepted frame.
#[derive(Debug)]
pub enum Step<'f> {
    /// Build this VM, take its page streams, say Ready.
    Prepare(Prepare),
    /// Allocate these memfd ranges ahead of their pages, if that pays (checked against guest
    /// RAM first).
    Extents(Vec<(u64, u64)>),
    /// Place these pages into guest RAM.
    Pages { head: BatchHead<'f>, data: &'f [u8] },
    /// Decompress, then place.
    Compressed(CompressedBatch<'f>),
    /// Place these pages, whose data follows on the stream.
    Direct(Vec<Entry>),
    /// Write these blocks into a copied disk.
    Disk(DiskBlocks<'f>),
    /// Post-copy: drop these pages (the source owes them), then say OwedPlaced unless the
    /// part is the last.
    Owed(Box<Owed>),
    /// A round is complete.
    RoundEnd(RoundEnd),
    /// The source's VM has paused: the downtime runs from here.
    Paused,
    /// Nothing beyond the new state.
    Nothing,
}

impl ReceiveMigrationState {
    /// The state's name, as errors give it.
    pub fn name(&self) -> &'static str {
        match self {
            ReceiveMigrationState::AwaitingConfig => "awaiting-config",
            ReceiveMigrationState::AwaitingExtents { .. } => "awaiting-extents",
            ReceiveMigrationState::ReceivingMemory { .. } => "receiving-memory",
            ReceiveMigrationState::OwedAhead { .. } => "owed-ahead",
            ReceiveMigrationState::OwedReceived { .. } => "owed-received",
            ReceiveMigrationState::StateReceived { .. } => "state-received",
            ReceiveMigrationState::Complete { .. } => "complete",
        }
    }

    /// The one transition function.
    pub fn next(self, frame: Frame<'_>) -> Result<(Self, Step<'_>), ProtocolError> {
        use ReceiveMigrationState as S;
        Ok(match (self, frame) {
            (S::AwaitingConfig, Frame::Config(p)) => {
                (S::AwaitingExtents { vm: p.vm.clone() }, Step::Prepare(p))
            }
            (S::AwaitingExtents { vm }, Frame::Extents(e)) => {
                (S::ReceivingMemory { vm, rounds: 0 }, Step::Extents(e))
            }
            (s @ S::ReceivingMemory { .. }, f) if is_pages(&f) => (s, page_step(f)),
            // In post-copy the disks' last blocks come after the pause, between the owed
            // pages named ahead and the rest.
            (s @ (S::ReceivingMemory { .. } | S::OwedAhead { .. }), Frame::DiskBlocks(d)) => {
                (s, Step::Disk(d))
            }
            (s @ (S::ReceivingMemory { .. } | S::OwedAhead { .. }), Frame::Paused) => {
                (s, Step::Paused)
            }
            (S::ReceivingMemory { vm, rounds }, Frame::RoundEnd(r)) => (
                S::ReceivingMemory {
                    vm,
                    rounds: rounds + 1,
                },
                Step::RoundEnd(r),
            ),
            (S::ReceivingMemory { vm, rounds }, Frame::Postcopy(part)) => {
                fits(&part, &vm)?;
                let owed = Box::new(part.clone());
                let step = Step::Owed(Box::new(part));
                if owed.last {
                    (S::OwedReceived { rounds, owed }, step)
                } else {
                    (S::OwedAhead { vm, rounds, owed }, step)
                }
            }
            (
                S::OwedAhead {
                    vm,
                    rounds,
                    mut owed,
                },
                Frame::Postcopy(part),
            ) if part.last => {
                fits(&part, &vm)?;
                owed.merge(&part);
                owed.last = true;
                (S::OwedReceived { rounds, owed }, Step::Owed(Box::new(part)))
            }
            // Whether the state fits the VM built is the VM's to say when it loads it.
            (S::ReceivingMemory { rounds, .. }, Frame::State(state)) => (
                S::StateReceived {
                    rounds,
                    state,
                    owed: None,
                },
                Step::Nothing,
            ),
            (S::OwedReceived { rounds, owed }, Frame::State(state)) => (
                S::StateReceived {
                    rounds,
                    state,
                    owed: Some(owed),
                },
                Step::Nothing,
            ),
            (
                S::StateReceived {
                    rounds,
                    state,
                    owed,
                },
                Frame::Done,
            ) => (
                S::Complete {
                    rounds,
                    state,
                    owed,
                },
                Step::Nothing,
            ),
            (s, f) => {
                return Err(ProtocolError::Unexpected {
                    kind: f.kind(),
                    state: s.name(),
                })
            }
        })
    }
}

/// A Postcopy frame's bitmap must cover the VM's RAM.
fn fits(owed: &Owed, vm: &VmConfig) -> Result<(), ProtocolError> {
    if owed.ram_bytes == vm.memory {
        return Ok(());
    }
    Err(ProtocolError::Malformed {
        kind: Kind::Postcopy,
        why: format!(
            "a bitmap over {} bytes for a VM of {}",
            owed.ram_bytes, vm.memory
        ),
    })
}

fn is_pages(f: &Frame<'_>) -> bool {
    matches!(
        f,
        Frame::Pages { .. } | Frame::PagesCompressed(_) | Frame::PagesDirect(_)
    )
}

/// The step for a page frame (see [`is_pages`]).
fn page_step(f: Frame<'_>) -> Step<'_> {
    match f {
        Frame::Pages { head, data } => Step::Pages { head, data },
        Frame::PagesCompressed(c) => Step::Compressed(c),
        Frame::PagesDirect(head) => Step::Direct(head.entries().to_vec()),
        _ => Step::Nothing,
    }
}

/// Where a page stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamState {
    /// Pages and round ends arrive.
    Receiving,
    /// The source said Done: this stream carries nothing more.
    Finished,
}

impl StreamState {
    pub fn name(self) -> &'static str {
        match self {
            StreamState::Receiving => "stream-receiving",
            StreamState::Finished => "stream-finished",
        }
    }

    /// The page stream's transition function.
    pub fn next(self, frame: Frame<'_>) -> Result<(Self, Step<'_>), ProtocolError> {
        Ok(match (self, frame) {
            (StreamState::Receiving, f) if is_pages(&f) => (self, page_step(f)),
            (StreamState::Receiving, Frame::RoundEnd(r)) => (self, Step::RoundEnd(r)),
            (StreamState::Receiving, Frame::Done) => (StreamState::Finished, Step::Nothing),
            (s, f) => {
                return Err(ProtocolError::Unexpected {
                    kind: f.kind(),
                    state: s.name(),
                })
            }
        })
    }
}

/// Where post-copy's background push is, on the control connection once the VM runs here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushState {
    /// Owed pages arrive.
    Pushing,
    /// The source has sent every owed page.
    Ended,
}

impl PushState {
    pub fn name(self) -> &'static str {
        match self {
            PushState::Pushing => "postcopy-pushing",
            PushState::Ended => "postcopy-ended",
        }
    }

    /// The push's transition function: pages until PostcopyEnd.
    pub fn next(self, frame: Frame<'_>) -> Result<(Self, Step<'_>), ProtocolError> {
        Ok(match (self, frame) {
            (PushState::Pushing, Frame::PostcopyPages { head, data }) => {
                (self, Step::Pages { head, data })
            }
            (PushState::Pushing, Frame::PostcopyEnd) => (PushState::Ended, Step::Nothing),
            (s, f) => {
                return Err(ProtocolError::Unexpected {
                    kind: f.kind(),
                    state: s.name(),
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{FrameReader, FrameWriter, VerifyOutcome};

    fn vm() -> VmConfig {
        VmConfig::new(64 << 20, 1)
    }

    fn state_for(config: VmConfig) -> Box<Snapshot> {
        Box::new(Snapshot::node(
            "vm",
            1,
            vec![Snapshot::new("config", 1, &config).unwrap()],
        ))
    }

    fn prepare() -> Frame<'static> {
        Frame::Config(Prepare {
            vm: vm(),
            streams: 0,
            session: 1,
            name: None,
            origin: None,
            generation: None,
            host_cache: None,
            sections: Vec::new(),
            disks: Vec::new(),
            postcopy: false,
        })
    }

    fn verified() -> Frame<'static> {
        Frame::Verified(VerifyOutcome {
            ok: true,
            verifiable: true,
            detail: String::new(),
            cpu_seconds: 0.0,
            resumed_ms: 0.0,
        })
    }

    /// Feeds `s` a frame it must refuse; the error names the state and the frame's kind.
    fn refuses(s: ReceiveMigrationState, f: Frame<'_>) {
        let (name, kind) = (s.name(), f.kind());
        let e = s.next(f).expect_err("unexpected frame accepted");
        let msg = e.to_string();
        assert!(
            matches!(e, ProtocolError::Unexpected { kind: k, state } if k == kind && state == name),
            "{msg}"
        );
        assert!(
            msg.contains(name) && msg.contains(&format!("{kind:?}")),
            "{msg}"
        );
    }

    fn receiving() -> ReceiveMigrationState {
        ReceiveMigrationState::ReceivingMemory {
            vm: vm(),
            rounds: 0,
        }
    }

    #[test]
    fn a_migration_walks_every_state_in_order() {
        let s = ReceiveMigrationState::AwaitingConfig;
        let (s, step) = s.next(prepare()).unwrap();
        assert!(matches!(step, Step::Prepare(p) if p.vm == vm()));
        assert_eq!(s.name(), "awaiting-extents");
        let (s, step) = s.next(Frame::Extents(vec![(0, 4096)])).unwrap();
        assert!(matches!(step, Step::Extents(e) if e == [(0, 4096)]));
        let (s, step) = s
            .next(Frame::RoundEnd(RoundEnd { round: 0, pages: 0 }))
            .unwrap();
        assert!(matches!(step, Step::RoundEnd(_)));
        // The source paused: the last round follows.
        let (s, step) = s.next(Frame::Paused).unwrap();
        assert!(matches!(step, Step::Paused));
        assert_eq!(s.name(), "receiving-memory");
        let (s, _) = s.next(Frame::State(state_for(vm()))).unwrap();
        assert_eq!(s.name(), "state-received");
        let (s, _) = s.next(Frame::Done).unwrap();
        assert!(matches!(
            s,
            ReceiveMigrationState::Complete {
                rounds: 1,
                owed: None,
                ..
            }
        ));
    }

    #[test]
    fn post_copy_names_the_owed_pages_before_the_state() {
        let mut ahead = Owed::new(vm().memory);
        ahead.mark(4096);
        let (s, step) = receiving().next(Frame::Postcopy(ahead.clone())).unwrap();
        assert!(matches!(step, Step::Owed(o) if !o.last));
        assert_eq!(s.name(), "owed-ahead");
        // Only the last part may follow the first, and nothing else.
        let (s2, _) = receiving().next(Frame::Postcopy(ahead.clone())).unwrap();
        refuses(s2, Frame::State(state_for(vm())));
        let (s, step) = s.next(Frame::Paused).unwrap();
        assert!(matches!(step, Step::Paused));
        // The copied disks' last blocks, taken at the pause.
        let mut disk = Vec::new();
        let run = crate::protocol::DiskRun {
            offset: 0,
            len: 512,
            zero: true,
        };
        FrameWriter::new(&mut disk)
            .send_disk_blocks(0, None, &[run], 0, &[])
            .unwrap();
        let mut frames = FrameReader::new(&disk[..]);
        let (s, step) = s.next(frames.next_frame().unwrap()).unwrap();
        assert!(matches!(step, Step::Disk(d) if d.runs == [run]));
        assert_eq!(s.name(), "owed-ahead");
        let mut owed = Owed::new(vm().memory);
        owed.mark(8192);
        owed.last = true;
        let (s, step) = s.next(Frame::Postcopy(owed.clone())).unwrap();
        assert!(matches!(step, Step::Owed(o) if o.last && o.pages == 1));
        assert_eq!(s.name(), "owed-received");
        owed.mark(4096);
        refuses(
            ReceiveMigrationState::OwedReceived {
                rounds: 0,
                owed: Box::new(owed.clone()),
            },
            Frame::RoundEnd(RoundEnd { round: 1, pages: 0 }),
        );
        let (s, _) = s.next(Frame::State(state_for(vm()))).unwrap();
        let (s, _) = s.next(Frame::Done).unwrap();
        assert!(matches!(s, ReceiveMigrationState::Complete { owed: Some(o), .. } if *o == owed));
        // A bitmap over other RAM than the VM's is refused.
        let e = receiving()
            .next(Frame::Postcopy(Owed::new(vm().memory * 2)))
            .unwrap_err();
        assert!(e.to_string().contains("bitmap"), "{e}");
    }

    #[test]
    fn the_push_carries_pages_until_its_end() {
        let s = PushState::Pushing;
        let (s, step) = s.next(Frame::PostcopyEnd).unwrap();
        assert!(matches!(step, Step::Nothing));
        assert_eq!(s, PushState::Ended);
        assert!(s.next(Frame::PostcopyEnd).is_err());
        assert!(PushState::Pushing.next(Frame::Done).is_err());
    }

    #[test]
    fn awaiting_config_refuses_anything_else() {
        refuses(ReceiveMigrationState::AwaitingConfig, Frame::Done);
        refuses(
            ReceiveMigrationState::AwaitingConfig,
            Frame::RoundEnd(RoundEnd { round: 0, pages: 0 }),
        );
        refuses(
            ReceiveMigrationState::AwaitingConfig,
            Frame::State(state_for(vm())),
        );
    }

    /// The extents come before any page, and once.
    #[test]
    fn awaiting_extents_refuses_pages_first() {
        let s = || ReceiveMigrationState::AwaitingExtents { vm: vm() };
        refuses(s(), direct_frame());
        refuses(s(), Frame::RoundEnd(RoundEnd { round: 0, pages: 0 }));
        refuses(s(), Frame::State(state_for(vm())));
        refuses(s(), prepare());
        refuses(receiving(), Frame::Extents(Vec::new()));
    }

    /// A PagesDirect frame of one data page.
    fn direct_frame() -> Frame<'static> {
        let mut b = crate::protocol::PageBatch::default();
        b.push(4096, false);
        let head: &'static [u8] = Box::leak(b.head().into_boxed_slice());
        crate::protocol::decode(crate::protocol::Kind::PagesDirect, head).unwrap()
    }

    #[test]
    fn receiving_memory_refuses_config_done_and_answers() {
        refuses(receiving(), prepare());
        refuses(receiving(), Frame::Done);
        refuses(receiving(), Frame::Confirm(Default::default()));
        refuses(receiving(), verified());
    }

    #[test]
    fn state_received_refuses_all_but_done() {
        let s = || ReceiveMigrationState::StateReceived {
            rounds: 2,
            state: state_for(vm()),
            owed: None,
        };
        refuses(s(), Frame::RoundEnd(RoundEnd { round: 3, pages: 1 }));
        refuses(s(), Frame::State(state_for(vm())));
        refuses(s(), Frame::Ready);
    }

    #[test]
    fn complete_refuses_everything() {
        let s = || ReceiveMigrationState::Complete {
            rounds: 2,
            state: state_for(vm()),
            owed: None,
        };
        refuses(s(), Frame::Done);
        refuses(s(), Frame::RoundEnd(RoundEnd { round: 3, pages: 1 }));
    }

    #[test]
    fn page_streams_carry_pages_and_round_ends_until_done() {
        let s = StreamState::Receiving;
        let (s, step) = s
            .next(Frame::RoundEnd(RoundEnd { round: 1, pages: 9 }))
            .unwrap();
        assert!(matches!(step, Step::RoundEnd(_)));
        let (s, _) = s.next(Frame::Done).unwrap();
        assert_eq!(s, StreamState::Finished);
        for (st, f) in [
            (StreamState::Receiving, prepare()),
            (StreamState::Receiving, Frame::State(state_for(vm()))),
            (StreamState::Finished, Frame::Done),
            (
                StreamState::Finished,
                Frame::RoundEnd(RoundEnd { round: 2, pages: 0 }),
            ),
        ] {
            let (name, kind) = (st.name(), f.kind());
            let e = st.next(f).unwrap_err();
            assert!(
                matches!(e, ProtocolError::Unexpected { kind: k, state } if k == kind && state == name),
                "{e}"
            );
        }
    }
}
