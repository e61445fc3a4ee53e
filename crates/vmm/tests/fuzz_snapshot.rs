//! The snapshot manifest's decoder on stable, bounded: malformed variants of a valid
//! `state.bin` (mutated, and mutated with the checksum made right so the JSON behind it is
//! reached) must be refused without a panic or an allocation beyond the manifest limit.
use std::time::Duration;

use ram::GuestRam;
use vmm::snapshot;

#[global_allocator]
static METER: fuzzkit::Meter = fuzzkit::Meter;

const RAM: u64 = 64 << 20;

fn state() -> vmm::VmState {
    vmm::VmState {
        config: vmm::VmConfig::new(RAM, 1),
        vcpus: Vec::new(),
        pic_master: Default::default(),
        pic_slave: Default::default(),
        ioapic: Default::default(),
        pit: Default::default(),
        clock: Default::default(),
        uart: Default::default(),
        guest: Default::default(),
        skipped: Vec::new(),
        devices: Vec::new(),
    }
}

/// Makes the trailing xxh3 right for what precedes it.
fn resum(mut b: Vec<u8>) -> Vec<u8> {
    if b.len() >= 8 {
        let n = b.len() - 8;
        let sum = xxhash_rust::xxh3::xxh3_64(&b[..n]);
        b[n..].copy_from_slice(&sum.to_le_bytes());
    }
    b
}

#[test]
fn fuzz_snapshot_state_file() {
    let d = tempfile::tempdir().unwrap();
    let ram = GuestRam::new(RAM).unwrap();
    ram.write_at(0, &[7u8; 8192]).unwrap();
    snapshot::write(d.path(), &state(), &ram).unwrap();
    let seed = std::fs::read(d.path().join("state.bin")).unwrap();
    snapshot::check_state_file(&seed, RAM).expect("the seed is valid");
    fuzzkit::Meter::reset();
    let target = |b: &[u8]| {
        let _ = snapshot::check_state_file(b, RAM);
        let _ = snapshot::check_state_file(&resum(b.to_vec()), RAM);
    };
    let n = fuzzkit::run(&[seed], 100_000, 0x51a7e, Duration::from_secs(2), target);
    let largest = fuzzkit::Meter::largest();
    println!("fuzz snapshot state.bin: {n} inputs (each also re-checksummed), largest allocation {largest} bytes");
    assert!(largest < 4 << 20, "an allocation of {largest} bytes");
}
