//! Snapshots on disk: `state.bin` (magic, format version, length, JSON manifest, xxh3 of all
//! of it) and `memory.raw` (guest RAM in memfd order, sparse: zero pages are holes). Every
//! 2 MiB chunk of RAM has its hash in the manifest, so a flipped or truncated byte anywhere is
//! refused before a vCPU runs.
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};
use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::state::VmState;
use ram::{GuestRam, PAGE_SIZE};

pub const MAGIC: &[u8; 8] = b"LIVEMIGS";
pub const FORMAT_VERSION: u32 = 1;
pub const CHUNK: u64 = 2 << 20;
const STATE_FILE: &str = "state.bin";
const MEMORY_FILE: &str = "memory.raw";
/// A manifest larger than this is not ours (64 GiB of RAM needs ~1 MiB).
const MAX_MANIFEST: u64 = 64 << 20;
const HEADER_LEN: usize = std::mem::size_of::<StateHeader>();

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a livemig snapshot (bad magic)")]
    BadMagic { path: PathBuf },
    #[error(
        "{path}: snapshot format version {found}, this livemig reads version {FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: manifest length {len} is out of bounds (file has {file} bytes)")]
    Length { path: PathBuf, len: u64, file: u64 },
    #[error("{path}: checksum mismatch (stored {stored:#018x}, computed {computed:#018x}): the file is corrupt")]
    Checksum {
        path: PathBuf,
        stored: u64,
        computed: u64,
    },
    #[error("{path}: manifest does not parse: {source}")]
    Manifest {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: memory file is {found} bytes, the manifest says {want}")]
    MemorySize {
        path: PathBuf,
        found: u64,
        want: u64,
    },
    #[error("{path}: memory chunk at offset {offset:#x} is corrupt (hash mismatch)")]
    ChunkHash { path: PathBuf, offset: u64 },
    #[error("{path}: memory chunk at offset {offset:#x} should be all zero but holds data")]
    ChunkNotZero { path: PathBuf, offset: u64 },
    #[error("manifest lists {found} memory chunks, a {size}-byte VM has {want}")]
    ChunkCount { found: usize, want: u64, size: u64 },
    #[error("{path}: memory chunk size {found} is not this format's {CHUNK}")]
    ChunkSize { path: PathBuf, found: u64 },
    #[error("the manifest names memory file {name:?}, this format's is memory.raw")]
    MemoryFile { name: String },
    #[error("guest RAM: {0}")]
    Ram(ram::MemoryError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemoryManifest {
    pub file: String,
    pub size: u64,
    pub chunk_size: u64,
    /// xxh3 of each chunk in memfd order; None = all zero (a hole in the file).
    pub chunks: Vec<Option<u64>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub created_unix_ms: u64,
    pub state: VmState,
    pub memory: MemoryManifest,
}

/// What writing a snapshot cost.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotStats {
    pub dir: PathBuf,
    pub memory_bytes: u64,
    pub data_bytes_written: u64,
    pub zero_chunks: usize,
    pub ms: u64,
}

/// The extents of `ext` (sorted, disjoint) that fall in [a, b), clipped.
pub fn extents_in(ext: &[(u64, u64)], a: u64, b: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
    let first = ext.partition_point(|&(_, e)| e <= a);
    ext[first..]
        .iter()
        .take_while(move |&&(s, _)| s < b)
        .map(move |&(s, e)| (s.max(a), e.min(b)))
}

/// Feeds `len` zero bytes to the hasher: holes are hashed without touching guest RAM, since
/// reading a never-touched memfd page would allocate it.
fn hash_zeros(h: &mut Xxh3, mut len: u64) {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    while len > 0 {
        let n = len.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..n]);
        len -= n as u64;
    }
}

use ram::is_zero;

/// Writes a paused VM's state and RAM into `dir`.
pub fn write(dir: &Path, state: &VmState, ram: &GuestRam) -> Result<SnapshotStats, SnapshotError> {
    let t0 = Instant::now();
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mem_path = dir.join(MEMORY_FILE);
    let mem_file = File::create(&mem_path).map_err(io(&mem_path))?;
    mem_file.set_len(ram.size()).map_err(io(&mem_path))?;
    let extents = ram::data_extents(ram.backing_file(), ram.size()).map_err(io(&mem_path))?;
    let nchunks = ram.size().div_ceil(CHUNK);
    let mut chunks = Vec::with_capacity(usize::try_from(nchunks).unwrap_or(0));
    let mut written = 0u64;
    let mut buf = vec![0u8; CHUNK as usize];
    for c in 0..nchunks {
        let off = c * CHUNK;
        let end = (off + CHUNK).min(ram.size());
        let (hash, n) =
            write_chunk(ram, &extents, off, end, &mem_file, &mut buf).map_err(|e| match e {
                ChunkIo::File(source) => SnapshotError::Io {
                    path: mem_path.clone(),
                    source,
                },
                ChunkIo::Ram(e) => SnapshotError::Ram(e),
            })?;
        chunks.push(hash);
        written += n;
    }
    let t_copy = t0.elapsed();
    mem_file.sync_data().map_err(io(&mem_path))?;
    tracing::info!(
        scan_hash_write_ms = t_copy.as_millis() as u64,
        fsync_ms = (t0.elapsed() - t_copy).as_millis() as u64,
        bytes = written,
        "snapshot memory written"
    );
    let zero_chunks = chunks.iter().filter(|c| c.is_none()).count();
    let manifest = Manifest {
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        state: state.clone(),
        memory: MemoryManifest {
            file: MEMORY_FILE.into(),
            size: ram.size(),
            chunk_size: CHUNK,
            chunks,
        },
    };
    write_state(dir, &manifest)?;
    Ok(SnapshotStats {
        dir: dir.to_path_buf(),
        memory_bytes: ram.size(),
        data_bytes_written: written,
        zero_chunks,
        ms: t0.elapsed().as_millis() as u64,
    })
}

enum ChunkIo {
    File(std::io::Error),
    Ram(ram::MemoryError),
}

/// Hashes guest RAM `[off, end)` and writes its non-zero pages to `out` at the same offsets
/// (zero pages stay holes). Returns the hash (None: all zero) and the bytes written.
fn write_chunk(
    ram: &GuestRam,
    extents: &[(u64, u64)],
    off: u64,
    end: u64,
    out: &File,
    buf: &mut [u8],
) -> Result<(Option<u64>, u64), ChunkIo> {
    let page = PAGE_SIZE as usize;
    let mut h = Xxh3::new();
    let mut pos = off;
    let mut written = 0u64;
    for (s, e) in extents_in(extents, off, end) {
        hash_zeros(&mut h, s - pos);
        let bytes = &mut buf[..(e - s) as usize];
        ram.read_at(s, bytes).map_err(ChunkIo::Ram)?;
        h.update(bytes);
        // Runs of non-zero pages go out in one write; zero pages stay holes.
        let mut p = 0usize;
        while p < bytes.len() {
            if is_zero(&bytes[p..p + page]) {
                p += page;
                continue;
            }
            let start = p;
            while p < bytes.len() && !is_zero(&bytes[p..p + page]) {
                p += page;
            }
            out.write_all_at(&bytes[start..p], s + start as u64)
                .map_err(ChunkIo::File)?;
            written += (p - start) as u64;
        }
        pos = e;
    }
    hash_zeros(&mut h, end - pos);
    Ok(((written > 0).then(|| h.digest()), written))
}

/// Writes `state.bin`: header, JSON manifest, checksum.
fn write_state(dir: &Path, manifest: &Manifest) -> Result<(), SnapshotError> {
    let state_path = dir.join(STATE_FILE);
    let body = serde_json::to_vec(manifest).map_err(|source| SnapshotError::Manifest {
        path: state_path.clone(),
        source,
    })?;
    let header = StateHeader {
        magic: *MAGIC,
        version: U32::new(FORMAT_VERSION),
        reserved: U32::new(0),
        manifest_len: U64::new(body.len() as u64),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + 8);
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&body);
    let sum = xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    let mut f = File::create(&state_path).map_err(io(&state_path))?;
    f.write_all(&out).map_err(io(&state_path))?;
    f.sync_all().map_err(io(&state_path))
}

/// The fixed header of `state.bin`.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
struct StateHeader {
    magic: [u8; 8],
    version: U32,
    reserved: U32,
    manifest_len: U64,
}

/// Reads and checks `state.bin`.
pub fn read_manifest(dir: &Path) -> Result<Manifest, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let f = File::open(&path).map_err(io(&path))?;
    let file_len = f.metadata().map_err(io(&path))?.len();
    // Never read more than the largest state file there can be.
    if file_len > (HEADER_LEN + 8) as u64 + MAX_MANIFEST {
        return Err(SnapshotError::Length {
            path,
            len: file_len,
            file: file_len,
        });
    }
    let mut bytes = Vec::with_capacity(file_len as usize);
    f.take(file_len)
        .read_to_end(&mut bytes)
        .map_err(io(&path))?;
    parse_state(&path, &bytes)
}

/// Checks and parses the bytes of a `state.bin` (`path` names it in errors): magic, length,
/// checksum, version, then the JSON manifest.
pub fn parse_state(path: &Path, bytes: &[u8]) -> Result<Manifest, SnapshotError> {
    let path = path.to_path_buf();
    let file = bytes.len() as u64;
    let Ok((h, rest)) = StateHeader::read_from_prefix(bytes) else {
        return Err(SnapshotError::Length { path, len: 0, file });
    };
    if &h.magic != MAGIC {
        return Err(SnapshotError::BadMagic { path });
    }
    let len = h.manifest_len.get();
    if len > MAX_MANIFEST || HEADER_LEN as u64 + len + 8 != file {
        return Err(SnapshotError::Length { path, len, file });
    }
    let (body, sum) = rest.split_at(rest.len() - 8);
    let stored = U64::read_from_bytes(sum).map_or(0, |v| v.get());
    let computed = xxh3_64(&bytes[..bytes.len() - 8]);
    if stored != computed {
        return Err(SnapshotError::Checksum {
            path,
            stored,
            computed,
        });
    }
    // Checked after the checksum so a flipped version byte reads as corruption, not as a
    // snapshot from another livemig.
    if h.version.get() != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path,
            found: h.version.get(),
        });
    }
    serde_json::from_slice(body).map_err(|source| SnapshotError::Manifest { path, source })
}

/// Checks the memory manifest's shape against the RAM it is to fill, before any arithmetic
/// on its fields: it comes from a file, and a crafted one must get an error, not a panic.
fn check_memory_manifest(
    path: &Path,
    m: &MemoryManifest,
    ram_size: u64,
) -> Result<(), SnapshotError> {
    if m.chunk_size != CHUNK {
        return Err(SnapshotError::ChunkSize {
            path: path.to_path_buf(),
            found: m.chunk_size,
        });
    }
    let want = m.size.div_ceil(CHUNK);
    if m.size != ram_size || m.chunks.len() as u64 != want {
        return Err(SnapshotError::ChunkCount {
            found: m.chunks.len(),
            want,
            size: m.size,
        });
    }
    Ok(())
}

/// Everything a restore checks in a `state.bin` before it builds a VM of `ram_size` bytes:
/// what the fuzz target feeds bytes to.
pub fn check_state_file(bytes: &[u8], ram_size: u64) -> Result<Manifest, SnapshotError> {
    let path = Path::new(STATE_FILE);
    let m = parse_state(path, bytes)?;
    check_memory_manifest(path, &m.memory, ram_size)?;
    Ok(m)
}

/// Loads `memory.raw` into fresh guest RAM, checking every chunk.
pub fn load_memory(dir: &Path, m: &MemoryManifest, ram: &GuestRam) -> Result<(), SnapshotError> {
    let path = dir.join(&m.file);
    if m.file != MEMORY_FILE {
        return Err(SnapshotError::MemoryFile {
            name: m.file.clone(),
        });
    }
    check_memory_manifest(&path, m, ram.size())?;
    let f = File::open(&path).map_err(io(&path))?;
    let found = f.metadata().map_err(io(&path))?.len();
    if found != m.size {
        return Err(SnapshotError::MemorySize {
            path,
            found,
            want: m.size,
        });
    }
    let extents = ram::data_extents(&f, m.size).map_err(io(&path))?;
    let mut buf = vec![0u8; CHUNK as usize];
    for (off, hash) in (0..).step_by(CHUNK as usize).zip(&m.chunks) {
        let len = CHUNK.min(m.size - off);
        let data = extents_in(&extents, off, off + len);
        match hash {
            Some(h) => load_chunk(&f, &path, ram, data, off, len, *h, &mut buf)?,
            None => {
                // A zero chunk must be a hole, or hold only zeros.
                for (a, b) in data {
                    let bytes = &mut buf[..(b - a) as usize];
                    f.read_exact_at(bytes, a).map_err(io(&path))?;
                    if !is_zero(bytes) {
                        return Err(SnapshotError::ChunkNotZero { path, offset: off });
                    }
                }
            }
        }
    }
    Ok(())
}

/// Reads one chunk's data extents into guest RAM (through the memfd) and checks its hash; the
/// file's holes stay untouched in guest RAM too.
#[allow(clippy::too_many_arguments)]
fn load_chunk(
    f: &File,
    path: &Path,
    ram: &GuestRam,
    data: impl Iterator<Item = (u64, u64)>,
    off: u64,
    len: u64,
    want: u64,
    buf: &mut [u8],
) -> Result<(), SnapshotError> {
    let mut hasher = Xxh3::new();
    let mut pos = off;
    for (s, e) in data {
        hash_zeros(&mut hasher, s - pos);
        let bytes = &mut buf[..(e - s) as usize];
        f.read_exact_at(bytes, s).map_err(io(path))?;
        hasher.update(bytes);
        ram.write_at(s, bytes).map_err(SnapshotError::Ram)?;
        pos = e;
    }
    hash_zeros(&mut hasher, off + len - pos);
    if hasher.digest() != want {
        return Err(SnapshotError::ChunkHash {
            path: path.to_path_buf(),
            offset: off,
        });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::{GuestReport, UartState, VerifyResult};
    use crate::state::{Skipped, VmConfig};
    use crate::vcpu::VcpuState;

    /// A VmState with distinctive values in every kind of field.
    pub(crate) fn sample_state(memory: u64) -> VmState {
        let mut regs = kvm_bindings::kvm_regs {
            rip: 0x10_0042,
            rsp: 0x8000,
            ..Default::default()
        };
        regs.rflags = 0x202;
        let mut lapic = kvm_bindings::kvm_lapic_state::default();
        lapic.regs[0x20] = 7;
        let vcpu = VcpuState {
            id: 0,
            cpuid: vec![kvm_bindings::kvm_cpuid_entry2 {
                function: 1,
                eax: 0x806e9,
                ..Default::default()
            }],
            mp_state: kvm_bindings::kvm_mp_state { mp_state: 0 },
            regs,
            sregs: kvm_bindings::kvm_sregs {
                cr0: 0x8000_0011,
                efer: 0x500,
                ..Default::default()
            },
            xsave: (0..1024).collect(),
            fpu: Vec::new(),
            xcrs: Some(kvm_bindings::kvm_xcrs::default()),
            debug_regs: None,
            lapic,
            msrs: vec![kvm_bindings::kvm_msr_entry {
                index: 0x10,
                data: 123_456_789,
                ..Default::default()
            }],
            vcpu_events: Some(kvm_bindings::kvm_vcpu_events::default()),
            tsc_khz: Some(2_600_000),
        };
        VmState {
            config: VmConfig::new(memory, 1),
            vcpus: vec![vcpu],
            pic_master: Default::default(),
            pic_slave: kvm_bindings::kvm_irqchip {
                chip_id: 1,
                ..Default::default()
            },
            ioapic: kvm_bindings::kvm_irqchip {
                chip_id: 2,
                ..Default::default()
            },
            pit: Default::default(),
            clock: kvm_bindings::kvm_clock_data {
                clock: 987_654_321,
                ..Default::default()
            },
            uart: UartState {
                line_control: 3,
                in_buffer: vec![b'x'],
                ..Default::default()
            },
            guest: GuestReport {
                heartbeat: 42,
                ready_pages: Some(100),
                last_verify: Some(VerifyResult::Ok { pages: 99 }),
                verify_count: 1,
                panic_rip: None,
                ..Default::default()
            },
            skipped: vec![Skipped::new("nested state", "not offered")],
            devices: Vec::new(),
        }
    }

    #[test]
    fn state_round_trips_through_bytes() {
        let s = sample_state(64 << 20);
        let back = VmState::from_bytes(&s.to_bytes()).unwrap();
        assert_eq!(back.to_bytes(), s.to_bytes());
        assert_eq!(back.vcpus[0].regs.rip, 0x10_0042);
        assert_eq!(back.vcpus[0].msrs[0].data, 123_456_789);
        assert_eq!(back.vcpus[0].lapic.regs[0x20], 7);
        assert_eq!(back.clock.clock, 987_654_321);
        assert_eq!(back.guest.heartbeat, 42);
        assert_eq!(back.uart.in_buffer, vec![b'x']);
    }

    fn ram_with_data(size: u64) -> GuestRam {
        let ram = GuestRam::new(size).unwrap();
        // Data in the first 3 MiB and one page at 20 MiB; the rest stays untouched.
        let data: Vec<u8> = (0..3 << 20).map(|i: u64| i as u8 | 1).collect();
        ram.write_at(0, &data).unwrap();
        ram.write_at(20 << 20, &[0xaa]).unwrap();
        ram
    }

    fn contents(ram: &GuestRam) -> Vec<u8> {
        let mut v = vec![0u8; ram.size() as usize];
        ram.read_at(0, &mut v).unwrap();
        v
    }

    fn snapshot(dir: &Path) -> (GuestRam, SnapshotStats) {
        let ram = ram_with_data(64 << 20);
        let st = write(dir, &sample_state(64 << 20), &ram).unwrap();
        (ram, st)
    }

    #[test]
    fn round_trip_restores_every_byte_and_stays_sparse() {
        let d = tempfile::tempdir().unwrap();
        let (ram, st) = snapshot(d.path());
        assert_eq!(st.data_bytes_written, (3 << 20) + 4096);
        let on_disk = std::fs::metadata(d.path().join(MEMORY_FILE)).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(
            on_disk.blocks() * 512 < 8 << 20,
            "zero memory must not cost disk"
        );
        let m = read_manifest(d.path()).unwrap();
        assert_eq!(m.state.to_bytes(), sample_state(64 << 20).to_bytes());
        let fresh = GuestRam::new(64 << 20).unwrap();
        load_memory(d.path(), &m.memory, &fresh).unwrap();
        assert!(contents(&fresh) == contents(&ram));
    }

    /// Rewrites state.bin with `edit` applied to its manifest and a checksum that matches:
    /// what a crafted (not a corrupted) file looks like.
    fn craft(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
        let mut m = serde_json::to_value(read_manifest(dir).unwrap()).unwrap();
        edit(&mut m);
        let m: Manifest = serde_json::from_value(m).unwrap();
        write_state(dir, &m).unwrap();
    }

    #[test]
    fn a_crafted_manifest_is_refused_not_a_panic() {
        let d = tempfile::tempdir().unwrap();
        snapshot(d.path());
        let fresh = || GuestRam::new(64 << 20).unwrap();
        craft(d.path(), |m| m["memory"]["chunk_size"] = 0.into());
        let m = read_manifest(d.path()).unwrap();
        let e = load_memory(d.path(), &m.memory, &fresh()).unwrap_err();
        assert!(
            matches!(e, SnapshotError::ChunkSize { found: 0, .. }),
            "{e}"
        );
        craft(d.path(), |m| {
            m["memory"]["chunk_size"] = CHUNK.into();
            m["memory"]["chunks"] = serde_json::json!([]);
        });
        let m = read_manifest(d.path()).unwrap();
        let e = load_memory(d.path(), &m.memory, &fresh()).unwrap_err();
        assert!(
            matches!(e, SnapshotError::ChunkCount { found: 0, .. }),
            "{e}"
        );
        craft(d.path(), |m| {
            m["memory"]["file"] = "../../etc/passwd".into()
        });
        let m = read_manifest(d.path()).unwrap();
        let e = load_memory(d.path(), &m.memory, &fresh()).unwrap_err();
        assert!(matches!(e, SnapshotError::MemoryFile { .. }), "{e}");
    }

    fn flip(path: &Path, at: u64) {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x01], at).unwrap();
    }

    #[test]
    fn a_flipped_byte_anywhere_in_state_is_refused() {
        let d = tempfile::tempdir().unwrap();
        snapshot(d.path());
        let path = d.path().join(STATE_FILE);
        let len = std::fs::metadata(&path).unwrap().len();
        let orig = std::fs::read(&path).unwrap();
        for at in [0, 9, 17, 30, len / 2, len - 9, len - 1] {
            std::fs::write(&path, &orig).unwrap();
            flip(&path, at);
            let e = read_manifest(d.path()).expect_err("corrupt state must be refused");
            assert!(
                matches!(
                    e,
                    SnapshotError::BadMagic { .. }
                        | SnapshotError::Checksum { .. }
                        | SnapshotError::Length { .. }
                ),
                "byte {at}: {e}"
            );
        }
    }

    #[test]
    fn truncated_or_foreign_state_is_refused() {
        let d = tempfile::tempdir().unwrap();
        snapshot(d.path());
        let path = d.path().join(STATE_FILE);
        let orig = std::fs::read(&path).unwrap();
        for n in [0, 5, HEADER_LEN, orig.len() / 2, orig.len() - 1] {
            std::fs::write(&path, &orig[..n]).unwrap();
            assert!(
                matches!(read_manifest(d.path()), Err(SnapshotError::Length { .. })),
                "cut at {n}"
            );
        }
        // A well-formed file from a future format version.
        let mut v2 = orig.clone();
        v2[8..12].copy_from_slice(&2u32.to_le_bytes());
        let body_end = v2.len() - 8;
        let sum = xxh3_64(&v2[..body_end]);
        v2[body_end..].copy_from_slice(&sum.to_le_bytes());
        std::fs::write(&path, &v2).unwrap();
        let e = read_manifest(d.path()).unwrap_err();
        assert!(matches!(e, SnapshotError::Version { found: 2, .. }), "{e}");
        // An oversized length field.
        let mut big = orig.clone();
        big[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &big).unwrap();
        assert!(matches!(
            read_manifest(d.path()),
            Err(SnapshotError::Length { .. })
        ));
    }

    #[test]
    fn corrupt_memory_is_refused() {
        let d = tempfile::tempdir().unwrap();
        snapshot(d.path());
        let m = read_manifest(d.path()).unwrap();
        let mem = d.path().join(MEMORY_FILE);
        let orig = std::fs::read(&mem).unwrap();
        // A flipped byte in a data chunk.
        flip(&mem, (1 << 20) + 17);
        let e = load_memory(d.path(), &m.memory, &GuestRam::new(64 << 20).unwrap()).unwrap_err();
        assert!(
            matches!(e, SnapshotError::ChunkHash { offset: 0, .. }),
            "{e}"
        );
        // Data where the manifest says the chunk is all zero.
        std::fs::write(&mem, &orig).unwrap();
        flip(&mem, 40 << 20);
        let e = load_memory(d.path(), &m.memory, &GuestRam::new(64 << 20).unwrap()).unwrap_err();
        assert!(matches!(e, SnapshotError::ChunkNotZero { .. }), "{e}");
        // Truncated.
        std::fs::write(&mem, &orig[..orig.len() / 2]).unwrap();
        let e = load_memory(d.path(), &m.memory, &GuestRam::new(64 << 20).unwrap()).unwrap_err();
        assert!(matches!(e, SnapshotError::MemorySize { .. }), "{e}");
    }
}
