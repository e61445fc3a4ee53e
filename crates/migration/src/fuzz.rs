//! Fuzz targets: every decoder of bytes that come from the wire, each a function of one input
//! that must return (an error is fine) without panicking, hanging or allocating beyond the
//! frame limits. `cargo fuzz` runs them from `fuzz/` on nightly; `cargo test` runs them on
//! stable over a seeded corpus of malformed variants of valid traffic (tests/fuzz.rs).
use std::io::{BufReader, Cursor};
use std::sync::OnceLock;

use xxhash_rust::xxh3::Xxh3;

use crate::protocol::{
    self, decode, Frame, FrameReader, Hello, Kind, Opening, Transport, HEADER_LEN, VERSION,
};
use crate::recv::state::{ReceiveMigrationState, Step, StreamState};

/// Guest RAM size the targets check page offsets against.
const LIMIT: u64 = 64 << 20;

/// The handshake, both ways, and a page stream's hello.
pub fn handshake(data: &[u8]) {
    if let Ok(Opening::Control(h)) = protocol::read_opening(&mut Cursor::new(data)) {
        let _ = protocol::answer_hello(&mut Vec::new(), &h);
    }
    let ours = Hello {
        version: VERSION,
        transport: Transport::Direct,
        capabilities: 0,
    };
    let _ = protocol::read_hello_reply(&mut Cursor::new(data), &ours);
    let _ = protocol::read_data_hello(&mut Cursor::new(data), 7, 4);
}

/// A stream of frames as the destination's control connection reads it, through the receive
/// state machine, with every step's decoding carried out (page batches validated, compressed
/// ones decompressed, direct page data read into a scratch file).
pub fn frames(data: &[u8]) {
    drive(data, ReceiveMigrationState::AwaitingConfig, |s, f| {
        s.next(f)
    });
}

/// The same traffic as a page stream reads it.
pub fn stream_frames(data: &[u8]) {
    drive(data, StreamState::Receiving, |s, f| s.next(f));
}

/// Feeds `data`'s frames to a receive state machine until it refuses one or they run out.
fn drive<S, E>(
    data: &[u8],
    mut state: S,
    next: impl for<'f> Fn(S, Frame<'f>) -> Result<(S, Step<'f>), E>,
) {
    let mut br = BufReader::new(Cursor::new(data));
    let mut r = FrameReader::new(&mut br);
    while let Ok(frame) = r.next_frame() {
        let Ok((n, step)) = next(state, frame) else {
            break;
        };
        state = n;
        if let Some(len) = exercise(step) {
            let _ = r.read_direct(scratch(), &[(0, len)]);
        }
    }
}

/// As [`frames`], with every frame's checksum made right first: mutated traffic then gets
/// past the checksum to the decoders behind it.
pub fn frames_rechecked(data: &[u8]) {
    frames(&rechecksum(data));
}

/// One payload of any kind (the first byte picks it), decoded and carried out as a receiver in
/// the memory phase would.
pub fn payload(data: &[u8]) {
    let Some((&k, payload)) = data.split_first() else {
        return;
    };
    let kind = match k % 17 {
        0 => Kind::Config,
        1 => Kind::Ready,
        2 => Kind::Pages,
        3 => Kind::RoundEnd,
        4 => Kind::State,
        5 => Kind::Done,
        6 => Kind::Confirm,
        7 => Kind::Verified,
        8 => Kind::Abort,
        9 => Kind::PagesCompressed,
        10 => Kind::Extents,
        11 => Kind::PagesDirect,
        12 => Kind::DiskBlocks,
        13 => Kind::Postcopy,
        14 => Kind::PostcopyResume,
        15 => Kind::PageRequest,
        _ => Kind::PostcopyDone,
    };
    let Ok(frame) = decode(kind, payload) else {
        return;
    };
    let vm = migratable::VmConfig::new(LIMIT, 1);
    // Extents come first, before any page.
    let state = if matches!(frame, Frame::Extents(_)) {
        ReceiveMigrationState::AwaitingExtents { vm }
    } else {
        ReceiveMigrationState::ReceivingMemory { vm, rounds: 0 }
    };
    if let Ok((_, step)) = state.next(frame) {
        exercise(step);
    }
}

/// Applies every delta of a decoded batch to a scratch page, as a destination would.
fn apply_deltas(pages: &[protocol::PageRef<'_>]) {
    let mut page = vec![0u8; protocol::PAGE];
    for p in pages {
        if let (Some(d), Some(_)) = (p.data, p.base) {
            let _ = if p.replace {
                crate::delta::apply_replace(&mut page, d)
            } else {
                crate::delta::apply(&mut page, d)
            };
        }
    }
}

/// Carries out a step's decoding; returns the page data a direct batch announces.
fn exercise(step: Step<'_>) -> Option<usize> {
    match step {
        Step::Pages { head, data } => {
            if let Ok(pages) = head.pages(data, LIMIT, Kind::Pages) {
                apply_deltas(&pages);
            }
        }
        Step::Compressed(b) => {
            let mut out = Vec::new();
            if crate::codec::decompress(b.codec, b.data, b.raw_len, &mut out).is_ok() {
                if let Ok(pages) = b.head.pages(&out, LIMIT, Kind::PagesCompressed) {
                    apply_deltas(&pages);
                }
            }
        }
        Step::Direct(entries) => {
            if entries.iter().all(|e| e.offset() < LIMIT) {
                return Some(entries.iter().filter(|e| !e.is_zero()).count() * protocol::PAGE);
            }
        }
        Step::Extents(e) => {
            let _ = crate::recv::check_extents(&e, LIMIT);
        }
        Step::Disk(b) => {
            if let Some(codec) = b.codec {
                let mut out = Vec::new();
                let _ = crate::codec::decompress(codec, b.data, b.raw_len, &mut out);
            }
        }
        Step::Owed(o) => {
            let _ = o.runs().count();
        }
        Step::Prepare(_) | Step::RoundEnd(_) | Step::Paused | Step::Nothing => {}
    }
    None
}

/// A sparse scratch file for direct page data (a memfd: no disk).
fn scratch() -> &'static std::fs::File {
    static F: OnceLock<std::fs::File> = OnceLock::new();
    F.get_or_init(|| {
        let ram = ram::GuestRam::new(LIMIT).unwrap_or_else(|e| panic!("scratch RAM: {e}"));
        ram.backing_file()
            .try_clone()
            .unwrap_or_else(|e| panic!("scratch RAM: {e}"))
    })
}

/// Rewrites each frame's checksum to match what it covers (header and payload; a direct
/// frame's header and head), walking frame by frame as far as the bytes go.
pub fn rechecksum(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    let mut at = 0;
    while at + HEADER_LEN <= v.len() {
        let word = |i: usize| u32::from_le_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]) as usize;
        let start = at + HEADER_LEN;
        let len = word(at + 8);
        let covered = if v[at] == Kind::PagesDirect as u8 && start + 4 <= v.len() {
            (4 + word(start).min(protocol::MAX_BATCH_PAGES) * 8).min(len)
        } else {
            len
        };
        let end = start.saturating_add(covered).min(v.len());
        let mut sum = Xxh3::new();
        sum.update(&v[at..at + 16]);
        sum.update(&v[start..end]);
        let digest = sum.digest().to_le_bytes();
        v[at + 16..at + 24].copy_from_slice(&digest);
        let next = start.saturating_add(len);
        if next > v.len() {
            break;
        }
        at = next;
    }
    v
}
