//! PVH boot through linux-loader: load the ELF, write hvm_start_info, the memory map and the
//! command line. Works for any ELF with a XEN_ELFNOTE_PHYS32_ENTRY note (our workload guest, a
//! Linux vmlinux built with CONFIG_PVH).
use std::io::Cursor;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Address, GuestAddress};

use ram::{layout, GuestRam};

pub const START_INFO_ADDR: u64 = 0x6000;
pub const MEMMAP_ADDR: u64 = 0x7000;
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
/// Boot GDT and (empty) IDT for the 32-bit PVH entry, as Firecracker places them.
pub const BOOT_GDT_ADDR: u64 = 0x500;
pub const BOOT_IDT_ADDR: u64 = 0x520;
const HIMEM_START: u64 = 0x100000;
const EBDA_START: u64 = 0x9fc00;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("loading the kernel ELF failed: {0}")]
    Load(#[from] linux_loader::loader::Error),
    #[error("the kernel ELF has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): {0}")]
    NoPvhEntry(String),
    #[error("kernel command line rejected: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    #[error("writing PVH boot parameters failed: {0}")]
    Configure(#[from] linux_loader::configurator::Error),
}

/// Where the boot vCPU starts.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    pub entry: u64,
    pub start_info: u64,
}

pub fn load_pvh(ram: &GuestRam, kernel: &[u8], cmdline: &str) -> Result<BootEntry, BootError> {
    let loaded = Elf::load(
        ram.memory(),
        None,
        &mut Cursor::new(kernel),
        Some(GuestAddress(HIMEM_START)),
    )?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr.raw_value(),
        other => return Err(BootError::NoPvhEntry(other.to_string())),
    };

    let mut cl = Cmdline::new(CMDLINE_MAX)?;
    cl.insert_str(cmdline)?;
    linux_loader::loader::load_cmdline(ram.memory(), GuestAddress(CMDLINE_ADDR), &cl)?;

    let mut memmap = vec![hvm_memmap_table_entry {
        addr: 0,
        size: EBDA_START,
        type_: E820_RAM,
        reserved: 0,
    }];
    for r in layout(ram.size()) {
        let start = r.guest.max(HIMEM_START);
        memmap.push(hvm_memmap_table_entry {
            addr: start,
            size: r.guest + r.len - start,
            type_: E820_RAM,
            reserved: 0,
        });
    }
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(START_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams(&params, ram.memory())?;
    Ok(BootEntry {
        entry,
        start_info: START_INFO_ADDR,
    })
}
