//! The fuzz targets on stable, bounded: each runs on malformed variants of valid traffic (a
//! seeded mutator, so every run tries the same inputs), and must not panic, hang or allocate
//! more than the largest frame the protocol allows. `cargo fuzz run <target>` (fuzz/) runs the
//! same targets unbounded on nightly.
use std::time::Duration;

use migration::codec::{compress, Codec};
use migration::fuzz;
use migration::protocol::{
    write_data_hello, write_hello, DeltaHead, FrameWriter, Hello, Kind, PageBatch, Prepare,
    RefHead, RoundEnd, Transport, VerifyOutcome, PAGE, VERSION,
};
use zerocopy::IntoBytes;

#[global_allocator]
static METER: fuzzkit::Meter = fuzzkit::Meter;

/// Inputs per target: enough to reach every decoder many times over, fast enough for CI.
const INPUTS: usize = 40_000;

fn handshakes() -> Vec<Vec<u8>> {
    let mut a = Vec::new();
    for t in [Transport::Tcp, Transport::Compressed, Transport::Direct] {
        let mut h = Vec::new();
        write_hello(
            &mut h,
            &Hello {
                version: VERSION,
                transport: t,
                capabilities: 0,
            },
        )
        .unwrap();
        a.push(h);
    }
    let mut d = Vec::new();
    write_data_hello(&mut d, 3, 7).unwrap();
    a.push(d);
    a
}

fn batch(pages: &[(u64, Option<u8>)]) -> (Vec<u8>, Vec<u8>) {
    let mut b = PageBatch::default();
    let mut data = Vec::new();
    for (off, fill) in pages {
        b.push(*off, fill.is_none());
        if let Some(f) = fill {
            data.extend((0..PAGE).map(|i| (i as u8).wrapping_mul(*f)));
        }
    }
    (b.head(), data)
}

/// A batch with a whole page and a delta.
fn delta_batch() -> (Vec<u8>, Vec<u8>) {
    let mut b = PageBatch::default();
    b.push(0, false);
    b.push_delta(4096);
    let old = vec![1u8; PAGE];
    let mut new = old.clone();
    new[8] = 2;
    new[1000] = 7;
    let mut enc = Vec::new();
    assert!(migration::delta::encode(&old, &new, &mut enc));
    let mut data = vec![3u8; PAGE];
    data.extend_from_slice(DeltaHead::new(migration::delta::base_hash(&old), enc.len()).as_bytes());
    data.extend(enc);
    (b.head(), data)
}

fn state_json() -> Vec<u8> {
    // State sections as a source sends them: a tree with state at its leaves.
    let s = migratable::Snapshot::node(
        "vm",
        1,
        vec![
            migratable::Snapshot::new("clock", 1, &42u64).unwrap(),
            migratable::Snapshot::node(
                "vcpus",
                1,
                vec![migratable::Snapshot::new("vcpu0", 1, &[1u64, 2, 3]).unwrap()],
            ),
        ],
    );
    s.to_bytes()
}

/// A whole migration's control traffic, every frame kind in it.
fn traffic() -> Vec<Vec<u8>> {
    let mut w = FrameWriter::new(Vec::new());
    w.send_config(&Prepare {
        vm: migratable::VmConfig::new(64 << 20, 1),
        streams: 0,
        session: 9,
        name: Some("db".into()),
        origin: Some("host-a".into()),
        generation: Some(3),
        host_cache: None,
        sections: vec![migratable::SectionId::new("clock", 1)],
        disks: vec![migration::protocol::DiskOffer {
            name: "disk0".into(),
            file: "db.img".into(),
            size: 1 << 20,
            allocated: 8192,
        }],
        postcopy: false,
    })
    .unwrap();
    let run = |offset, len, zero| migration::protocol::DiskRun { offset, len, zero };
    w.send_disk_blocks(
        0,
        None,
        &[run(0, 4096, false), run(8192, 4096, true)],
        4096,
        &[3u8; 4096],
    )
    .unwrap();
    w.send_redirect(&migration::protocol::Redirect { port: 7001 })
        .unwrap();
    let (head, data) = batch(&[(0, Some(3)), (4096, None), (8192, Some(5))]);
    w.send_pages(&head, &data).unwrap();
    let (dhead, ddata) = delta_batch();
    w.send_pages(&dhead, &ddata).unwrap();
    let mut r = PageBatch::default();
    r.push_ref(8192);
    w.send_pages(
        &r.head(),
        RefHead::new(0, *blake3::hash(&[3u8; PAGE]).as_bytes()).as_bytes(),
    )
    .unwrap();
    let mut c = Vec::new();
    compress(Codec::Zstd, &ddata, &mut c).unwrap();
    w.send_compressed(Codec::Zstd, ddata.len(), &dhead, &c)
        .unwrap();
    for codec in [Codec::Lz4, Codec::Zstd] {
        let mut c = Vec::new();
        compress(codec, &data, &mut c).unwrap();
        w.send_compressed(codec, data.len(), &head, &c).unwrap();
    }
    w.send_direct_head(&head, data.len()).unwrap();
    w.write_raw(&data).unwrap();
    w.send_extents(&[(0, 1 << 20), (2 << 20, 3 << 20)]).unwrap();
    w.send_round_end(RoundEnd { round: 0, pages: 3 }).unwrap();
    w.send(Kind::State, &state_json()).unwrap();
    w.send(Kind::Done, &[]).unwrap();
    let whole = w.inner().clone();
    let mut answers = FrameWriter::new(Vec::new());
    answers.send(Kind::Ready, &[]).unwrap();
    answers
        .send_verified(&VerifyOutcome {
            ok: true,
            verifiable: true,
            detail: "VERIFY OK pages=1".into(),
            cpu_seconds: 0.1,
            resumed_ms: 0.0,
        })
        .unwrap();
    answers.send_abort("no room").unwrap();
    vec![whole, answers.inner().clone()]
}

fn payloads() -> Vec<Vec<u8>> {
    let (head, data) = batch(&[(0, Some(3)), (4096, None)]);
    let with = |k: u8, p: &[u8]| [&[k][..], p].concat();
    let mut owed = migration::protocol::Owed::new(64 << 20);
    owed.mark(8192);
    let mut c = Vec::new();
    compress(Codec::Zstd, &data, &mut c).unwrap();
    let mut compressed = vec![Codec::Zstd as u8, 0, 0, 0];
    compressed.extend_from_slice(&(data.len() as u32).to_le_bytes());
    compressed.extend_from_slice(&head);
    compressed.extend_from_slice(&c);
    vec![
        with(
            0,
            br#"{"vm":{"memory":67108864,"vcpus":1},"streams":2,"session":5}"#,
        ),
        with(2, &[head.clone(), data].concat()),
        with(3, &[1, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0]),
        with(4, &state_json()),
        with(7, br#"{"ok":true,"detail":"x","cpu_seconds":1.0}"#),
        with(9, &compressed),
        with(10, &head),
        with(13, &owed.encode()),
        with(14, &owed.encode()),
        with(15, &[0u8, 16, 0, 0, 0, 0, 0, 0]),
        with(16, br#"{"faults":1,"fault_p50_us":2,"fault_p99_us":3,"fault_max_us":4,"pages_demanded":1,"pages_pushed":2,"complete_ms":5}"#),
    ]
}

/// Runs one target over its corpus; checks the allocation bound; returns inputs tried.
fn run(name: &str, seeds: &[Vec<u8>], target: impl Fn(&[u8])) -> usize {
    fuzzkit::Meter::reset();
    let n = fuzzkit::run(seeds, INPUTS, 0x5eed, Duration::from_secs(2), target);
    // A length field alone never makes the reader allocate more than a step of its buffer
    // (1 MiB) or a batch; only data that arrives does, up to its frame kind's limit.
    let bound = Kind::PagesCompressed.max_len() + (1 << 20);
    let largest = fuzzkit::Meter::largest();
    assert!(
        largest <= bound,
        "{name}: an allocation of {largest} bytes (bound {bound})"
    );
    println!("fuzz {name}: {n} inputs, largest allocation {largest} bytes");
    n
}

/// One test, the targets in turn: the allocation meter is global to this binary.
#[test]
fn fuzz_every_decoder() {
    let total = run("handshake", &handshakes(), fuzz::handshake)
        + run("frames", &traffic(), fuzz::frames)
        + run("frames_rechecked", &traffic(), fuzz::frames_rechecked)
        + run("stream_frames", &traffic(), |d| {
            fuzz::stream_frames(&fuzz::rechecksum(d))
        })
        + run("payload", &payloads(), fuzz::payload);
    println!("fuzz: {total} inputs in all");
}
