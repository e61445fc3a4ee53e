//! virtio-blk driven as a guest drives it, without KVM: requests reach the image and come
//! back, the pages the device writes are in the dirty bitmap, and the device's state moves to
//! a second device on the same image with the lock following it.
mod common;

use std::sync::Arc;

use common::{Buf, Driver, Msis, NoIoEvents};
use pci::PciDevice;
use virtio_devices::block::{Block, DiskConfig};
use virtio_devices::{DeviceError, VirtioPci};
use vm_memory::GuestMemoryBackend;

const F_FLUSH: u64 = 1 << 9;
const VERSION_1: u64 = 1 << 32;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x10_1000;
const STATUS: u64 = 0x10_3000;
const READ_BACK: u64 = 0x20_0000;

fn image(len: u64) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(len).unwrap();
    f
}

fn device(
    path: &std::path::Path,
    ram: &Arc<ram::GuestRam>,
    lock: bool,
) -> Result<(VirtioPci<Block>, Arc<Msis>), DeviceError> {
    let cfg = DiskConfig {
        path: path.to_path_buf(),
        readonly: false,
    };
    let msis = Arc::new(Msis::default());
    let dev = VirtioPci::new(
        Block::open("disk0", &cfg, lock)?,
        ram.clone(),
        msis.clone(),
        Arc::new(NoIoEvents),
    )?;
    Ok((dev, msis))
}

/// A request: its header, its data buffer (if any), its status byte.
fn request(drv: &mut Driver, kind: u32, sector: u64, data: Option<(u64, u32, bool)>) -> u16 {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    drv.ram.write_at(HDR, &h).unwrap();
    drv.ram.write_at(STATUS, &[0xff]).unwrap();
    let mut bufs = vec![Buf {
        addr: HDR,
        len: 16,
        write: false,
    }];
    if let Some((addr, len, write)) = data {
        bufs.push(Buf { addr, len, write });
    }
    bufs.push(Buf {
        addr: STATUS,
        len: 1,
        write: true,
    });
    drv.add(0, &bufs)
}

fn status(drv: &Driver) -> u8 {
    let mut s = [0u8];
    drv.ram.read_at(STATUS, &mut s).unwrap();
    s[0]
}

fn do_request<D: PciDevice>(
    d: &mut D,
    drv: &mut Driver,
    kind: u32,
    sector: u64,
    data: Option<(u64, u32, bool)>,
) -> (u8, u32) {
    let head = request(drv, kind, sector, data);
    drv.notify(d, 0);
    let (used_head, len) = drv.wait_used(0);
    assert_eq!(used_head, head);
    (status(drv), len)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn requests_reach_the_image_and_come_back_with_interrupts() {
    let img = image(1 << 20);
    let ram = common::ram();
    let (mut dev, msis) = device(img.path(), &ram, true).unwrap();
    let mut drv = Driver::init(&mut dev, ram.clone(), VERSION_1 | F_FLUSH, 1);
    assert_eq!(drv.read_device_config(&mut dev, 0, 8), (1 << 20) / 512);

    let data = pattern(7, 8192);
    ram.write_at(DATA, &data).unwrap();
    let (st, len) = do_request(&mut dev, &mut drv, 1, 16, Some((DATA, 8192, false)));
    assert_eq!((st, len), (0, 1), "a write says only its status");
    let mut on_disk = vec![0u8; 8192];
    std::os::unix::fs::FileExt::read_exact_at(img.as_file(), &mut on_disk, 16 * 512).unwrap();
    assert_eq!(on_disk, data);

    let (st, len) = do_request(&mut dev, &mut drv, 0, 16, Some((READ_BACK, 8192, true)));
    assert_eq!((st, len), (0, 8193));
    let mut back = vec![0u8; 8192];
    ram.read_at(READ_BACK, &mut back).unwrap();
    assert_eq!(back, data);

    assert_eq!(do_request(&mut dev, &mut drv, 4, 0, None).0, 0, "FLUSH");
    let (st, len) = do_request(&mut dev, &mut drv, 8, 0, Some((READ_BACK, 20, true)));
    assert_eq!((st, len), (0, 21));
    let mut id = [0u8; 20];
    ram.read_at(READ_BACK, &mut id).unwrap();
    assert!(id.starts_with(b"livemig-disk0"));

    let beyond = (1 << 20) / 512 - 1;
    let (st, _) = do_request(&mut dev, &mut drv, 0, beyond, Some((READ_BACK, 1024, true)));
    assert_eq!(st, 1, "a read past the end is an I/O error");
    assert_eq!(
        do_request(&mut dev, &mut drv, 99, 0, None).0,
        2,
        "unsupported"
    );
    assert!(msis.count() >= 6, "each completion interrupts");
    assert!(msis
        .0
        .lock()
        .unwrap()
        .iter()
        .all(|m| *m == (common::MSI_ADDR, 0x30)));
    let st = virtio_devices::VirtioDevice::status(dev.device());
    assert_eq!(st["writes"], 1);
    assert_eq!(st["reads"], 1);
    assert_eq!(st["errors"], 2);
}

/// What the device writes into guest RAM (read data, the used ring) is in the bitmap a
/// migration's dirty log reads.
#[test]
fn pages_the_device_writes_are_marked_dirty() {
    let img = image(1 << 20);
    let ram = common::ram();
    let (mut dev, _) = device(img.path(), &ram, true).unwrap();
    let mut drv = Driver::init(&mut dev, ram.clone(), VERSION_1, 1);
    let dma = ram.dma().unwrap();
    let take = || -> Vec<u64> {
        let bits = dma.iter().next().unwrap().bitmap().get_and_reset();
        (0..bits.len() * 64)
            .filter(|p| bits[p / 64] & (1 << (p % 64)) != 0)
            .map(|p| p as u64)
            .collect()
    };
    take();
    do_request(
        &mut dev,
        &mut drv,
        0,
        0,
        Some((READ_BACK + 0x3000, 4096, true)),
    );
    let pages = take();
    let used_page = drv.rings[0].used / 4096;
    for p in [(READ_BACK + 0x3000) / 4096, STATUS / 4096, used_page] {
        assert!(pages.contains(&p), "page {p:#x} not in {pages:x?}");
    }
    assert!(
        !pages.contains(&(HDR / 4096)),
        "the device only read the header"
    );
}

/// The state moves to a second device on the same image: a request the driver made available
/// while the first was paused is done once, by the second, which holds the lock from its
/// restore; the first cannot take it back.
#[test]
fn state_and_lock_move_to_another_device() {
    let img = image(1 << 20);
    let ram = common::ram();
    let (mut a, _) = device(img.path(), &ram, true).unwrap();
    let mut drv = Driver::init(&mut a, ram.clone(), VERSION_1 | F_FLUSH, 1);
    for i in 0..3u8 {
        ram.write_at(DATA, &pattern(i, 512)).unwrap();
        do_request(&mut a, &mut drv, 1, u64::from(i), Some((DATA, 512, false)));
    }
    a.pause().unwrap();
    let data = pattern(42, 512);
    ram.write_at(DATA, &data).unwrap();
    let head = request(&mut drv, 1, 9, Some((DATA, 512, false)));
    drv.notify(&mut a, 0);
    let state = a.state().unwrap();
    assert_eq!(state.live.as_ref().unwrap()[0].next_used, 3);

    let (mut b, b_msis) = device(img.path(), &ram, false).unwrap();
    let e = b.restore(&state).unwrap_err();
    assert!(matches!(e, DeviceError::Locked { .. }), "{e}");
    virtio_devices::VirtioDevice::hand_over(a.device_mut()).unwrap();
    b.restore(&state).unwrap();
    assert!(b.device().locked());
    b.resume().unwrap();
    assert_eq!(
        drv.wait_used(0).0,
        head,
        "the second device does the waiting request"
    );
    assert_eq!(status(&drv), 0);
    assert!(b_msis.count() >= 1);
    let mut on_disk = vec![0u8; 512];
    std::os::unix::fs::FileExt::read_exact_at(img.as_file(), &mut on_disk, 9 * 512).unwrap();
    assert_eq!(on_disk, data);
    assert_eq!(drv.used_idx(0), 4, "done once");

    let e = a.resume().unwrap_err();
    assert!(
        e.to_string().contains("another VM has this disk open"),
        "{e}"
    );

    // A request after the move goes on with the moved indices.
    do_request(&mut b, &mut drv, 4, 0, None);
    assert_eq!(drv.used_idx(0), 5);
    let st = virtio_devices::VirtioDevice::status(b.device());
    assert_eq!(st["writes"], 4, "counters moved: {st}");
}

#[test]
fn a_second_vm_on_a_locked_image_and_a_disk_of_another_size_are_refused() {
    let img = image(1 << 20);
    let ram = common::ram();
    let (a, _) = device(img.path(), &ram, true).unwrap();
    let e = device(img.path(), &ram, true).err().unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "disk0: {} is locked by another process (another VM has this disk open)",
            img.path().display()
        )
    );
    let state = a.state().unwrap();
    let other = image(2 << 20);
    let (mut b, _) = device(other.path(), &ram, false).unwrap();
    let e = b.restore(&state).unwrap_err();
    assert!(e.to_string().contains("2048 sectors, "), "{e}");
    let e = device(std::path::Path::new("/nonexistent/disk.img"), &ram, true)
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .starts_with("disk0: opening /nonexistent/disk.img: "),
        "{e}"
    );
}
