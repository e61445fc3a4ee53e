//! vCPUs: boot setup (CPUID, PVH registers), complete architectural state capture/restore, and
//! the per-thread run loop that pauses on request.
use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::boot::{BootEntry, BOOT_GDT_ADDR, BOOT_IDT_ADDR};
use crate::devices::IoBus;
use crate::state::Skipped;
use ram::GuestRam;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {id}: {op} failed: {source}")]
    Kvm {
        id: u8,
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: KVM set only {set} of {total} MSRs; MSR {msr:#x} was refused")]
    MsrsPartial {
        id: u8,
        set: usize,
        total: usize,
        msr: u32,
    },
    #[error("vCPU {id}: writing the boot GDT into guest memory failed: {source}")]
    BootGdt {
        id: u8,
        source: vm_memory::GuestMemoryError,
    },
    #[error("vCPU {id}: state has {got} bytes of xsave, this host needs {want}")]
    XsaveSize { id: u8, got: usize, want: usize },
    #[error("vCPU {id}: building {what} for KVM failed: {source}")]
    Fam {
        id: u8,
        what: &'static str,
        source: vmm_sys_util::fam::Error,
    },
}

fn kvm_err(id: u8, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { id, op, source }
}

/// What this host's KVM can save and restore, decided once per VM.
#[derive(Clone, Debug)]
pub struct Caps {
    pub xsave_bytes: usize,
    pub xcrs: bool,
    pub debugregs: bool,
    pub vcpu_events: bool,
    pub nested_state: bool,
    pub tsc_control: bool,
    pub msr_index_list: Vec<u32>,
}

impl Caps {
    pub fn probe(kvm: &Kvm, vm: &kvm_ioctls::VmFd) -> Result<Self, kvm_ioctls::Error> {
        use kvm_ioctls::Cap;
        let xsave_bytes = if vm.check_extension(Cap::Xsave2) {
            usize::try_from(vm.check_extension_int(Cap::Xsave2))
                .unwrap_or(0)
                .max(std::mem::size_of::<kvm_xsave>())
        } else if kvm.check_extension(Cap::Xsave) {
            std::mem::size_of::<kvm_xsave>()
        } else {
            0
        };
        Ok(Caps {
            xsave_bytes,
            xcrs: kvm.check_extension(Cap::Xcrs),
            debugregs: kvm.check_extension(Cap::Debugregs),
            vcpu_events: kvm.check_extension(Cap::VcpuEvents),
            nested_state: kvm.check_extension(Cap::NestedState),
            tsc_control: kvm.check_extension(Cap::TscControl),
            msr_index_list: kvm.get_msr_index_list()?.as_slice().to_vec(),
        })
    }
}

/// Everything KVM holds for one vCPU.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// XSAVE area (legacy FPU/SSE included) as 32-bit words; empty where KVM lacks XSAVE.
    pub xsave: Vec<u32>,
    /// kvm_fpu bytes, only where KVM lacks XSAVE.
    pub fpu: Vec<u8>,
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: Option<kvm_debugregs>,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: Option<kvm_vcpu_events>,
    pub tsc_khz: Option<u32>,
}

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// CPUID for vCPU `id` of `count`: KVM's supported set with this vCPU's topology.
pub fn cpuid_for(base: &CpuId, id: u8, count: u8) -> CpuId {
    let mut c = base.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | ((count as u32) << 16) | ((id as u32) << 24);
                if count > 1 {
                    e.edx |= 1 << 28;
                }
                e.ecx |= 1 << 31; // hypervisor present
            }
            0xb | 0x1f => e.edx = id as u32,
            _ => {}
        }
    }
    c
}

pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, kvm_ioctls::Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
}

/// The TSC frequency KVM gives a new vCPU on this host, as the workload guest is told it (other
/// VMMs running the same guest pass the same value on its command line).
pub fn host_tsc_khz() -> Result<u32, kvm_ioctls::Error> {
    let kvm = Kvm::new()?;
    let vm = kvm.create_vm()?;
    vm.create_vcpu(0)?.get_tsc_khz()
}

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index as u16 * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if present == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Sets up a fresh vCPU: CPUID, LAPIC LINT pins, FPU, boot MSRs; the BSP also gets the PVH
/// 32-bit entry state (flat segments, paging off, %ebx = start_info).
pub fn configure(
    vcpu: &VcpuFd,
    id: u8,
    cpuid: &CpuId,
    ram: &GuestRam,
    boot: Option<BootEntry>,
) -> Result<(), VcpuError> {
    use vm_memory::{Bytes, GuestAddress};
    vcpu.set_cpuid2(cpuid)
        .map_err(kvm_err(id, "KVM_SET_CPUID2"))?;

    let mut lapic = vcpu.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let v = lapic_reg(&lapic, reg);
        set_lapic_reg(&mut lapic, reg, (v & !0x700) | (mode << 8));
    }
    vcpu.set_lapic(&lapic)
        .map_err(kvm_err(id, "KVM_SET_LAPIC"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err(id, "KVM_SET_FPU"))?;

    // Fast strings on; MTRRs on with write-back default, or a real guest runs uncached.
    let msrs = Msrs::from_entries(&[
        kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: 1,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_MTRR_DEF_TYPE,
            data: (1 << 11) | 6,
            ..Default::default()
        },
    ])
    .map_err(|source| VcpuError::Fam {
        id,
        what: "boot MSRs",
        source,
    })?;
    vcpu.set_msrs(&msrs).map_err(kvm_err(id, "KVM_SET_MSRS"))?;

    let Some(boot) = boot else { return Ok(()) };
    let gdt = [
        gdt_entry(0, 0, 0),
        gdt_entry(0xc09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
    ];
    for (i, e) in gdt.iter().enumerate() {
        ram.memory()
            .write_obj(*e, GuestAddress(BOOT_GDT_ADDR + i as u64 * 8))
            .map_err(|source| VcpuError::BootGdt { id, source })?;
    }
    ram.memory()
        .write_obj(0u64, GuestAddress(BOOT_IDT_ADDR))
        .map_err(|source| VcpuError::BootGdt { id, source })?;
    let mut sregs = vcpu.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
    sregs.gdt.base = BOOT_GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);
    sregs.cr0 = 0x1 | 0x10; // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs)
        .map_err(kvm_err(id, "KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: boot.entry,
        rbx: boot.start_info,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err(id, "KVM_SET_REGS"))?;
    Ok(())
}

pub fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b: Vec<u8> = l.regs[off..off + 4]
        .iter()
        .map(|&c| c.cast_unsigned())
        .collect();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = (*b).cast_signed();
    }
}

/// MSRs from KVM's index list that this vCPU can actually read; the rest are reported skipped.
pub fn saveable_msrs(vcpu: &VcpuFd, caps: &Caps, skipped: &mut Vec<Skipped>) -> Vec<u32> {
    let mut ok = Vec::with_capacity(caps.msr_index_list.len());
    for &index in &caps.msr_index_list {
        let readable = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .ok()
        .and_then(|mut m| vcpu.get_msrs(&mut m).ok())
            == Some(1);
        if readable {
            ok.push(index);
        } else {
            skipped.push(Skipped::new(
                format!("msr {index:#x}"),
                "listed by KVM_GET_MSR_INDEX_LIST but KVM_GET_MSRS refuses it",
            ));
        }
    }
    ok
}

pub fn capture(
    vcpu: &VcpuFd,
    id: u8,
    caps: &Caps,
    msr_list: &[u32],
) -> Result<VcpuState, VcpuError> {
    let mp_state = vcpu
        .get_mp_state()
        .map_err(kvm_err(id, "KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(kvm_err(id, "KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
    let (xsave, fpu) = if caps.xsave_bytes > std::mem::size_of::<kvm_xsave>() {
        let extra = (caps.xsave_bytes - std::mem::size_of::<kvm_xsave>()).div_ceil(4);
        let mut x = Xsave::new(extra).map_err(|source| VcpuError::Fam {
            id,
            what: "xsave2 buffer",
            source,
        })?;
        // SAFETY: the buffer holds the full size KVM_CAP_XSAVE2 reported.
        unsafe { vcpu.get_xsave2(&mut x) }.map_err(kvm_err(id, "KVM_GET_XSAVE2"))?;
        let mut words = x.as_fam_struct_ref().xsave.region.to_vec();
        words.extend_from_slice(x.as_slice());
        (words, Vec::new())
    } else if caps.xsave_bytes > 0 {
        let x = vcpu.get_xsave().map_err(kvm_err(id, "KVM_GET_XSAVE"))?;
        (x.region.to_vec(), Vec::new())
    } else {
        let f = vcpu.get_fpu().map_err(kvm_err(id, "KVM_GET_FPU"))?;
        // SAFETY: kvm_fpu is a plain-old-data C struct; we copy its bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const f).cast::<u8>(), std::mem::size_of::<kvm_fpu>())
        };
        (Vec::new(), bytes.to_vec())
    };
    let xcrs = if caps.xcrs {
        Some(vcpu.get_xcrs().map_err(kvm_err(id, "KVM_GET_XCRS"))?)
    } else {
        None
    };
    let debug_regs = if caps.debugregs {
        Some(
            vcpu.get_debug_regs()
                .map_err(kvm_err(id, "KVM_GET_DEBUGREGS"))?,
        )
    } else {
        None
    };
    let lapic = vcpu.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
    let tsc_khz = vcpu.get_tsc_khz().ok();
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err(id, "KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let entries: Vec<kvm_msr_entry> = msr_list
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|source| VcpuError::Fam {
        id,
        what: "MSR list",
        source,
    })?;
    let n = vcpu
        .get_msrs(&mut msrs)
        .map_err(kvm_err(id, "KVM_GET_MSRS"))?;
    if n != entries.len() {
        return Err(VcpuError::MsrsPartial {
            id,
            set: n,
            total: entries.len(),
            msr: entries[n].index,
        });
    }
    let vcpu_events = if caps.vcpu_events {
        Some(
            vcpu.get_vcpu_events()
                .map_err(kvm_err(id, "KVM_GET_VCPU_EVENTS"))?,
        )
    } else {
        None
    };
    Ok(VcpuState {
        id,
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        fpu,
        xcrs,
        debug_regs,
        lapic,
        msrs: msrs.as_slice().to_vec(),
        vcpu_events,
        tsc_khz,
    })
}

/// Loads captured state into a freshly created vCPU, in the order KVM needs.
pub fn restore(vcpu: &VcpuFd, s: &VcpuState, caps: &Caps) -> Result<(), VcpuError> {
    let id = s.id;
    if let (Some(khz), true) = (s.tsc_khz, caps.tsc_control) {
        if vcpu.get_tsc_khz().ok() != Some(khz) {
            vcpu.set_tsc_khz(khz)
                .map_err(kvm_err(id, "KVM_SET_TSC_KHZ"))?;
        }
    }
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|source| VcpuError::Fam {
        id,
        what: "CPUID",
        source,
    })?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(kvm_err(id, "KVM_SET_CPUID2"))?;
    vcpu.set_mp_state(s.mp_state)
        .map_err(kvm_err(id, "KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs)
        .map_err(kvm_err(id, "KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs)
        .map_err(kvm_err(id, "KVM_SET_SREGS"))?;
    if !s.xsave.is_empty() {
        let base = std::mem::size_of::<kvm_xsave>() / 4;
        if s.xsave.len() * 4 > caps.xsave_bytes.max(base * 4) || s.xsave.len() < base {
            return Err(VcpuError::XsaveSize {
                id,
                got: s.xsave.len() * 4,
                want: caps.xsave_bytes,
            });
        }
        let mut x = Xsave::new(s.xsave.len() - base).map_err(|source| VcpuError::Fam {
            id,
            what: "xsave2 buffer",
            source,
        })?;
        // SAFETY: we only write the fixed region and the FAM entries the wrapper allocated.
        unsafe {
            x.as_mut_fam_struct()
                .xsave
                .region
                .copy_from_slice(&s.xsave[..base])
        };
        x.as_mut_slice().copy_from_slice(&s.xsave[base..]);
        // SAFETY: the buffer's size matches what it holds; KVM reads at most KVM_CAP_XSAVE2 bytes.
        let r = unsafe {
            if s.xsave.len() > base {
                vcpu.set_xsave2(&x)
            } else {
                vcpu.set_xsave(&x.as_fam_struct_ref().xsave)
            }
        };
        r.map_err(kvm_err(id, "KVM_SET_XSAVE"))?;
    } else if s.fpu.len() == std::mem::size_of::<kvm_fpu>() {
        // SAFETY: kvm_fpu is plain-old-data and the length matches exactly.
        let fpu: kvm_fpu = unsafe { std::ptr::read_unaligned(s.fpu.as_ptr().cast::<kvm_fpu>()) };
        vcpu.set_fpu(&fpu).map_err(kvm_err(id, "KVM_SET_FPU"))?;
    }
    if let Some(x) = &s.xcrs {
        vcpu.set_xcrs(x).map_err(kvm_err(id, "KVM_SET_XCRS"))?;
    }
    if let Some(d) = &s.debug_regs {
        vcpu.set_debug_regs(d)
            .map_err(kvm_err(id, "KVM_SET_DEBUGREGS"))?;
    }
    vcpu.set_lapic(&s.lapic)
        .map_err(kvm_err(id, "KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&s.msrs).map_err(|source| VcpuError::Fam {
        id,
        what: "MSR list",
        source,
    })?;
    let n = vcpu.set_msrs(&msrs).map_err(kvm_err(id, "KVM_SET_MSRS"))?;
    if n != s.msrs.len() {
        return Err(VcpuError::MsrsPartial {
            id,
            set: n,
            total: s.msrs.len(),
            msr: s.msrs[n].index,
        });
    }
    if let Some(e) = &s.vcpu_events {
        vcpu.set_vcpu_events(e)
            .map_err(kvm_err(id, "KVM_SET_VCPU_EVENTS"))?;
    }
    Ok(())
}

// ---- the run loop ----

/// Requests to a vCPU thread.
pub enum VcpuRequest {
    Pause,
    Resume,
    Capture(Sender<Result<VcpuState, VcpuError>>),
    Exit,
}

/// What a vCPU thread tells the VM.
#[derive(Debug)]
pub enum VcpuEvent {
    Paused(u8),
    Resumed(u8),
    /// The thread ended: guest shutdown, guest exit request, or a KVM failure.
    Stopped {
        id: u8,
        reason: StopReason,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    Requested,
    GuestShutdown,
    Failed(String),
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_bindings::kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal: makes the next or current KVM_RUN return at once with EINTR.
pub extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set before the thread
        // enters KVM_RUN and valid for the thread's life; a byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
    }
}

pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Auto-converge's lever: while `pct` > 0 every vCPU sleeps that share of each slice, so a
/// guest that dirties memory faster than the link carries it slows down.
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);

pub struct VcpuThread {
    pub id: u8,
    pub throttle: Arc<AtomicU8>,
    pub fd: VcpuFd,
    pub io: Arc<IoBus>,
    pub requests: Receiver<VcpuRequest>,
    pub events: Sender<VcpuEvent>,
    pub caps: Arc<Caps>,
    pub msr_list: Arc<Vec<u32>>,
}

impl VcpuThread {
    /// Sleeps the throttled share of the slice once the running share is used up. Wakes early
    /// when the throttle is lifted (a pause must not wait for it).
    fn throttle_sleep(&self, slice_start: &mut Instant) {
        let pct = self.throttle.load(Ordering::Relaxed).min(99) as u32;
        if pct == 0 {
            *slice_start = Instant::now();
            return;
        }
        if slice_start.elapsed() < THROTTLE_SLICE * (100 - pct) / 100 {
            return;
        }
        let until = Instant::now() + THROTTLE_SLICE * pct / 100;
        loop {
            let now = Instant::now();
            if now >= until || self.throttle.load(Ordering::Relaxed) == 0 {
                break;
            }
            std::thread::sleep((until - now).min(Duration::from_millis(1)));
        }
        *slice_start = Instant::now();
    }

    pub fn run(mut self, start_paused: bool) {
        let run_ptr = self.fd.get_kvm_run() as *mut kvm_bindings::kvm_run;
        KVM_RUN.with(|r| r.set(run_ptr));
        let mut paused = start_paused;
        if paused {
            let _ = self.events.send(VcpuEvent::Paused(self.id));
        }
        let mut slice_start = Instant::now();
        let reason = loop {
            let req = if paused {
                match self.requests.recv() {
                    Ok(r) => Some(r),
                    Err(_) => break StopReason::Requested,
                }
            } else {
                self.requests.try_recv().ok()
            };
            if let Some(req) = req {
                match req {
                    VcpuRequest::Pause if !paused => {
                        // Finish any in-flight I/O so the state KVM reports is architecturally
                        // consistent: KVM_RUN with immediate_exit completes it and returns EINTR.
                        self.fd.set_kvm_immediate_exit(1);
                        let _ = self.fd.run();
                        self.fd.set_kvm_immediate_exit(0);
                        let _ = self.fd.kvmclock_ctrl();
                        paused = true;
                        let _ = self.events.send(VcpuEvent::Paused(self.id));
                    }
                    VcpuRequest::Pause => {
                        let _ = self.events.send(VcpuEvent::Paused(self.id));
                    }
                    VcpuRequest::Resume => {
                        paused = false;
                        let _ = self.events.send(VcpuEvent::Resumed(self.id));
                    }
                    VcpuRequest::Capture(reply) => {
                        let r = capture(&self.fd, self.id, &self.caps, &self.msr_list);
                        let _ = reply.send(r);
                    }
                    VcpuRequest::Exit => break StopReason::Requested,
                }
                continue;
            }
            match self.fd.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoOut(port, data) => self.io.pio_write(port, data),
                    VcpuExit::IoIn(port, data) => self.io.pio_read(port, data),
                    VcpuExit::MmioRead(addr, data) => self.io.mmio_read(addr, data),
                    VcpuExit::MmioWrite(addr, data) => self.io.mmio_write(addr, data),
                    VcpuExit::Hlt | VcpuExit::Shutdown => break StopReason::GuestShutdown,
                    VcpuExit::SystemEvent(..) => break StopReason::GuestShutdown,
                    VcpuExit::FailEntry(reason, cpu) => {
                        break StopReason::Failed(format!(
                            "KVM_EXIT_FAIL_ENTRY reason {reason:#x} on host cpu {cpu}"
                        ))
                    }
                    VcpuExit::InternalError => {
                        break StopReason::Failed("KVM_EXIT_INTERNAL_ERROR".to_string())
                    }
                    other => tracing::debug!(vcpu = self.id, "unhandled exit {other:?}"),
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => break StopReason::Failed(format!("KVM_RUN: {e}")),
            }
            if self.io.stop_requested() {
                break StopReason::GuestShutdown;
            }
            self.throttle_sleep(&mut slice_start);
        };
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
        let _ = self.events.send(VcpuEvent::Stopped {
            id: self.id,
            reason,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_code_segment_decodes() {
        let s = segment_from_gdt(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(
            (s.selector, s.type_, s.present, s.db, s.s, s.g),
            (8, 0xb, 1, 1, 1, 1)
        );
        let tss = segment_from_gdt(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!((tss.limit, tss.g, tss.type_, tss.s), (0x67, 0, 0xb, 0));
    }
}
