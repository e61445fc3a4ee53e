//! One VM: KVM VM fd, guest RAM, devices and vCPU threads; boot, pause/resume, capture/restore.
use std::collections::HashSet;
use std::io::Write;
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::Serialize;
use vm_superio::serial::NoEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::boot::{load_pvh, BootError};
use crate::devices::{GuestReport, IoBus, IrqTrigger, SerialDevice, VerifyResult, COM1_GSI};
use crate::dirty::DirtyLog;
use crate::pci_devices::{DevicesError, PciDevices};
use crate::priority::{self, PriorityError, Tid};
use crate::state::{Skipped, VmConfig, VmState};
use crate::vcpu::{self, Caps, StopReason, VcpuError, VcpuEvent, VcpuRequest, VcpuThread};
use migratable::{GuestVerdict, MigratableError, SectionId, Snapshot};
pub use migratable::{RunState, MAX_VCPUS};
use ram::{layout, GuestRam, MemoryError};
pub use virtio_devices::net::{Announce, NetOptions};

const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum VmError {
    /// opening /dev/kvm failed: {0}
    OpenKvm(kvm_ioctls::Error),
    /// KVM {op} failed: {source}
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    /// a VM needs 1..=64 vCPUs, not {0}
    VcpuCount(u8),
    /// {0}
    CpuFeature(#[from] migratable::cpu::UnknownFeature),
    /// {0}
    Memory(#[from] MemoryError),
    /// {0}
    Boot(#[from] BootError),
    /// {0}
    Vcpu(#[from] VcpuError),
    /// opening console {path}: {source}
    Console {
        path: PathBuf,
        source: std::io::Error,
    },
    /// creating the COM1 interrupt eventfd failed: {0}
    EventFd(std::io::Error),
    /// restoring the UART state failed: {0}
    Uart(String),
    /// spawning the vCPU {id} thread failed: {source}
    Spawn { id: u8, source: std::io::Error },
    /// vCPU {0} did not answer within 5 s (wanted: {1})
    VcpuTimeout(u8, &'static str),
    /// the VM is {0}, it must be paused for this
    NotPaused(RunState),
    /// the VM has stopped: {0}
    Stopped(String),
    /// filling guest RAM before boot failed: {0}
    Prefill(String),
    /// loading saved memory failed: {0}
    Restore(String),
    /// {0}
    Devices(#[from] DevicesError),
    /// {0}
    Device(#[from] virtio_devices::DeviceError),
}

fn kvm_op(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// Where COM1 output goes.
#[derive(Clone, Debug)]
pub enum Console {
    Stdout,
    File(PathBuf),
    Discard,
}

impl Console {
    fn open(&self) -> Result<Box<dyn Write + Send>, VmError> {
        Ok(match self {
            Console::Stdout => Box::new(std::io::stdout()),
            Console::Discard => Box::new(std::io::sink()),
            Console::File(p) => Box::new(std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| VmError::Console {
                        path: p.clone(),
                        source,
                    })?,
            )),
        })
    }
}

/// What runs in the VM: a PVH ELF and its command line.
pub struct Kernel {
    pub image: std::borrow::Cow<'static, [u8]>,
    pub cmdline: Cmdline,
}

/// What the VMM learns while it builds a VM, which a guest's command line may need.
#[derive(Clone, Copy, Debug)]
pub struct BootFacts {
    pub vcpus: u8,
    /// The guest's TSC rate, when KVM says.
    pub tsc_khz: Option<u32>,
}

/// A kernel's command line: given, or made from what the VMM learns at boot.
pub enum Cmdline {
    Fixed(String),
    AtBoot(Box<dyn Fn(&BootFacts) -> String + Send + Sync>),
}

impl Cmdline {
    fn render(&self, facts: &BootFacts) -> String {
        match self {
            Cmdline::Fixed(s) => s.clone(),
            Cmdline::AtBoot(f) => f(facts),
        }
    }
}

/// What `status` reports.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct VmStatus {
    pub state: RunState,
    pub vcpus: u8,
    pub memory_bytes: u64,
    pub resident_bytes: u64,
    pub heartbeat: u64,
    pub last_verify: Option<VerifyResult>,
    pub guest: GuestReport,
    pub stop_reason: Option<String>,
    /// Each disk and NIC: what it is and what it did.
    #[serde(default)]
    pub devices: Vec<serde_json::Value>,
}

struct VcpuHandle {
    id: u8,
    requests: Sender<VcpuRequest>,
    thread: Option<JoinHandle<()>>,
    /// The thread's kernel id, once it runs (0 before).
    tid: Arc<AtomicI32>,
}

/// The KVM VM and the guest RAM its memory slots point into. Fields drop in declaration order,
/// so the VM fd (and with it every memory slot) is closed before this struct lets go of the
/// mapping, whoever drops the last `Arc` of either.
pub struct KvmVm {
    pub fd: VmFd,
    pub ram: Arc<GuestRam>,
}

pub struct Vm {
    _kvm: Kvm,
    kvm_vm: Arc<KvmVm>,
    dirty: Arc<std::sync::Mutex<DirtyLog>>,
    config: VmConfig,
    io: Arc<IoBus>,
    caps: Arc<Caps>,
    msr_list: Arc<Vec<u32>>,
    skipped: Vec<Skipped>,
    vcpus: Vec<VcpuHandle>,
    devices: PciDevices,
    events: Receiver<VcpuEvent>,
    state: RunState,
    stop_reason: Option<String>,
    migrated: bool,
    _serial_irq: EventFd,
    /// Percent of each slice the vCPUs sleep (auto-converge), and the thread that kicks them.
    throttle: Arc<AtomicU8>,
    throttle_ticker: Option<JoinHandle<()>>,
    /// The vCPUs' priority while they yield the CPU to a migration.
    yielded: Option<priority::Lowered>,
}

/// KVM objects built before any state goes in. The vCPU fds come before the VM: fields drop
/// in order, and the VM's memory must outlive everything that keeps the VM alive.
struct Parts {
    kvm: Kvm,
    vcpu_fds: Vec<VcpuFd>,
    devices: PciDevices,
    vm: Arc<KvmVm>,
    caps: Caps,
    msr_list: Vec<u32>,
    skipped: Vec<Skipped>,
    serial_irq: EventFd,
}

/// The VM's KVM objects and devices; `arriving`: its state comes from elsewhere (the devices
/// then take what only one host may hold, disk locks, when it is loaded).
fn build_parts(config: &VmConfig, arriving: bool, net: &NetOptions) -> Result<Parts, VmError> {
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(VmError::VcpuCount(config.vcpus));
    }
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let vm = Arc::new(create_vm(&kvm, config.memory)?);
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm.fd
        .register_irqfd(&serial_irq, COM1_GSI)
        .map_err(kvm_op("KVM_IRQFD"))?;
    let caps = Caps::probe(&kvm, &vm.fd).map_err(kvm_op("KVM_GET_MSR_INDEX_LIST"))?;
    let mut skipped = uncaptured_state(&caps);
    let mut vcpu_fds = Vec::with_capacity(config.vcpus as usize);
    for id in 0..config.vcpus {
        vcpu_fds.push(
            vm.fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_op("KVM_CREATE_VCPU"))?,
        );
    }
    let msr_list = vcpu::saveable_msrs(&vcpu_fds[0], &caps, &mut skipped);
    let devices = PciDevices::build(config, &vm, arriving, net)?;
    Ok(Parts {
        kvm,
        vcpu_fds,
        devices,
        vm,
        caps,
        msr_list,
        skipped,
        serial_irq,
    })
}

/// A KVM VM with its in-kernel irqchip and PIT, and `memory` bytes of guest RAM in its slots.
fn create_vm(kvm: &Kvm, memory: u64) -> Result<KvmVm, VmError> {
    let fd = kvm.create_vm().map_err(kvm_op("KVM_CREATE_VM"))?;
    fd.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(kvm_op("KVM_SET_TSS_ADDR"))?;
    fd.create_irq_chip().map_err(kvm_op("KVM_CREATE_IRQCHIP"))?;
    fd.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_op("KVM_CREATE_PIT2"))?;
    // The fd and the RAM are tied together before any slot points into the RAM.
    let vm = KvmVm {
        fd,
        ram: Arc::new(GuestRam::new(memory)?),
    };
    for (slot, r) in (0u32..).zip(vm.ram.host_regions()) {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: r.range.guest,
            memory_size: r.range.len,
            userspace_addr: r.host_addr,
        };
        // SAFETY: the host range is a live mapping of `vm.ram`, exactly `len` bytes long.
        // KvmVm closes the fd before it drops its Arc of the RAM (field order), and vCPU fds
        // (which keep the VM alive in the kernel) are closed before the KvmVm (Parts' field
        // order; Vm joins its vCPU threads, which own them, before its fields drop), so no
        // memory slot outlives the mapping it points into.
        unsafe { vm.fd.set_user_memory_region(region) }
            .map_err(kvm_op("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(vm)
}

/// State this host's KVM cannot give us, and why: said in every snapshot and migration.
fn uncaptured_state(caps: &Caps) -> Vec<Skipped> {
    let mut skipped = vec![if caps.nested_state {
        Skipped::new(
            "nested state",
            "guests get no VMX/SVM in CPUID, so there is no nested state to capture",
        )
    } else {
        Skipped::new(
            "nested state",
            "KVM_CAP_NESTED_STATE not offered by this host's KVM; guests get no VMX/SVM, so there is none to lose",
        )
    }];
    if caps.xsave_bytes == 0 {
        skipped.push(Skipped::new(
            "xsave",
            "KVM_CAP_XSAVE missing: legacy FPU state (KVM_GET_FPU) captured instead",
        ));
    }
    if !caps.xcrs {
        skipped.push(Skipped::new("xcrs", "KVM_CAP_XCRS missing"));
    }
    if !caps.debugregs {
        skipped.push(Skipped::new("debug registers", "KVM_CAP_DEBUGREGS missing"));
    }
    if !caps.vcpu_events {
        skipped.push(Skipped::new("vcpu events", "KVM_CAP_VCPU_EVENTS missing"));
    }
    skipped
}

/// What this host offers a new guest: KVM's supported CPUID without virtualization, less the
/// features in `mask`.
pub fn offered_cpuid(kvm: &Kvm, mask: &[String]) -> Result<kvm_bindings::CpuId, VmError> {
    let mut base = vcpu::supported_cpuid(kvm).map_err(kvm_op("KVM_GET_SUPPORTED_CPUID"))?;
    strip_virtualization(&mut base);
    let mut leaves = leaves(&base);
    migratable::cpu::mask(&mut leaves, mask)?;
    for (e, l) in base.as_mut_slice().iter_mut().zip(&leaves) {
        (e.ebx, e.ecx, e.edx) = (l.ebx, l.ecx, l.edx);
    }
    Ok(base)
}

/// The named CPU features `cpuid` offers.
pub fn cpu_features(cpuid: &kvm_bindings::CpuId) -> std::collections::BTreeSet<String> {
    migratable::cpu::features(&leaves(cpuid))
}

/// KVM's CPUID entries as the feature table reads them.
fn leaves(cpuid: &kvm_bindings::CpuId) -> Vec<migratable::cpu::Leaf> {
    cpuid
        .as_slice()
        .iter()
        .map(|e| migratable::cpu::Leaf {
            function: e.function,
            index: e.index,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect()
}

/// The CPU features this host offers its guests, less `mask`.
pub fn host_cpu_features(mask: &[String]) -> Result<std::collections::BTreeSet<String>, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    Ok(cpu_features(&offered_cpuid(&kvm, mask)?))
}

fn strip_virtualization(cpuid: &mut kvm_bindings::CpuId) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => e.ecx &= !(1 << 5),           // VMX
            0x8000_0001 => e.ecx &= !(1 << 2), // SVM
            _ => {}
        }
    }
}

/// Registers the vCPU kick signal's handler once per process; every call reports how that one
/// registration went (a failed one is never taken for success later).
fn register_kick_handler() -> Result<(), VmError> {
    static REGISTERED: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = REGISTERED.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(vcpu::kick_signal(), vcpu::kick_handler)
            .map_err(|e| e.errno())
    });
    r.map_err(|errno| VmError::Kvm {
        op: "registering the vCPU kick signal",
        source: kvm_ioctls::Error::new(errno),
    })
}

impl Vm {
    /// Builds and boots a VM with fresh memory. `prefill` may write guest RAM before the kernel
    /// is loaded (memory content for benchmarks); RAM it leaves alone stays zero and unbacked.
    pub fn boot(
        mut config: VmConfig,
        kernel: &Kernel,
        console: &Console,
        net: &NetOptions,
        prefill: impl FnOnce(&GuestRam) -> Result<(), VmError>,
    ) -> Result<Vm, VmError> {
        let mut p = build_parts(&config, false, net)?;
        prefill(&p.vm.ram)?;
        let facts = BootFacts {
            vcpus: config.vcpus,
            tsc_khz: p.vcpu_fds[0].get_tsc_khz().ok(),
        };
        let cmdline = kernel.cmdline.render(&facts);
        let entry = load_pvh(&p.vm.ram, &kernel.image, &cmdline)?;
        tracing::info!(entry = format_args!("{:#x}", entry.entry), %cmdline, "kernel loaded");
        let base = offered_cpuid(&p.kvm, &config.cpu_mask)?;
        config.cpu_features = cpu_features(&base).into_iter().collect();
        for (id, fd) in p.vcpu_fds.iter().enumerate() {
            let cpuid = vcpu::cpuid_for(&base, id as u8, config.vcpus);
            vcpu::configure(fd, id as u8, &cpuid, &p.vm.ram, (id == 0).then_some(entry))?;
        }
        let serial = Serial::new(
            IrqTrigger(p.serial_irq.try_clone().map_err(VmError::EventFd)?),
            console.open()?,
        );
        let fds = std::mem::take(&mut p.vcpu_fds);
        let mut vm = Self::assemble(p, config, serial)?;
        vm.start_vcpus(fds, false)?;
        Ok(vm)
    }

    /// Builds a VM from captured state; `load_memory` fills its RAM before any vCPU exists.
    pub fn restore(
        state: &VmState,
        console: &Console,
        net: &NetOptions,
        start_paused: bool,
        load_memory: impl FnOnce(&GuestRam) -> Result<(), VmError>,
    ) -> Result<Vm, VmError> {
        let prepared = PreparedVm::new(&state.config, net)?;
        load_memory(prepared.ram())?;
        prepared.finish(state, console, start_paused)
    }

    fn assemble(p: Parts, config: VmConfig, serial: SerialDevice) -> Result<Vm, VmError> {
        register_kick_handler()?;
        let (_, events) = channel();
        let kvm_vm = p.vm;
        let dirty = DirtyLog::new(kvm_vm.clone());
        Ok(Vm {
            _kvm: p.kvm,
            kvm_vm,
            dirty: Arc::new(std::sync::Mutex::new(dirty)),
            config,
            io: Arc::new(IoBus::new(serial, p.devices.bus())),
            caps: Arc::new(p.caps),
            msr_list: Arc::new(p.msr_list),
            skipped: p.skipped,
            vcpus: Vec::new(),
            devices: p.devices,
            events,
            state: RunState::Paused,
            stop_reason: None,
            migrated: false,
            _serial_irq: p.serial_irq,
            throttle: Arc::new(AtomicU8::new(0)),
            throttle_ticker: None,
            yielded: None,
        })
    }

    fn start_vcpus(&mut self, fds: Vec<VcpuFd>, paused: bool) -> Result<(), VmError> {
        let (etx, erx) = channel();
        self.events = erx;
        for (id, fd) in fds.into_iter().enumerate() {
            let id = id as u8;
            let (tx, rx) = channel();
            let t = VcpuThread {
                id,
                throttle: self.throttle.clone(),
                fd,
                io: self.io.clone(),
                requests: rx,
                events: etx.clone(),
                caps: self.caps.clone(),
                msr_list: self.msr_list.clone(),
            };
            let tid = Arc::new(AtomicI32::new(0));
            let tid2 = tid.clone();
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    tid2.store(priority::current_tid(), Ordering::Relaxed);
                    t.run(paused);
                })
                .map_err(|source| VmError::Spawn { id, source })?;
            self.vcpus.push(VcpuHandle {
                id,
                requests: tx,
                thread: Some(thread),
                tid,
            });
        }
        self.state = if paused {
            let _first = self.starting_first();
            self.wait_all(|e| matches!(e, VcpuEvent::Paused(_)), "start paused")?;
            RunState::Paused
        } else {
            RunState::Running
        };
        Ok(())
    }

    /// Waits for one matching event from every vCPU.
    fn wait_all(
        &mut self,
        want: impl Fn(&VcpuEvent) -> bool,
        what: &'static str,
    ) -> Result<(), VmError> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut seen = HashSet::new();
        while seen.len() < self.vcpus.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(e) if want(&e) => {
                    let id = match e {
                        VcpuEvent::Paused(id) | VcpuEvent::Resumed(id) => id,
                        VcpuEvent::Stopped { id, .. } => id,
                    };
                    seen.insert(id);
                }
                Ok(VcpuEvent::Stopped { id, reason }) => {
                    self.note_stop(id, reason);
                    return Err(VmError::Stopped(
                        self.stop_reason.clone().unwrap_or_default(),
                    ));
                }
                Ok(_) => {}
                Err(_) => {
                    let missing = self
                        .vcpus
                        .iter()
                        .map(|v| v.id)
                        .find(|id| !seen.contains(id))
                        .unwrap_or(0);
                    return Err(VmError::VcpuTimeout(missing, what));
                }
            }
        }
        Ok(())
    }

    fn note_stop(&mut self, id: u8, reason: StopReason) {
        self.state = RunState::Stopped;
        if self.stop_reason.is_none() {
            self.stop_reason = Some(match reason {
                StopReason::Requested => format!("vCPU {id} stopped on request"),
                StopReason::GuestShutdown => match self.io.status.exit_code() {
                    Some(c) => format!("guest requested exit with code {c}"),
                    None => format!("guest shut down (vCPU {id})"),
                },
                StopReason::Failed(why) => format!("vCPU {id} failed: {why}"),
            });
        }
    }

    /// Picks up vCPU threads that stopped on their own (guest shutdown, KVM failure).
    pub fn poll(&mut self) -> RunState {
        while let Ok(e) = self.events.try_recv() {
            if let VcpuEvent::Stopped { id, reason } = e {
                self.note_stop(id, reason);
            }
        }
        self.state
    }

    /// Makes every vCPU sleep `pct`% of its time (0 = full speed; at most 99): auto-converge
    /// slows a guest that dirties memory faster than a migration can send it. A pause lifts it.
    pub fn set_throttle(&mut self, pct: u8) {
        let pct = pct.min(99);
        self.throttle.store(pct, Ordering::Relaxed);
        if pct == 0 {
            if let Some(t) = self.throttle_ticker.take() {
                let _ = t.join();
            }
            return;
        }
        if self.throttle_ticker.is_some() {
            return;
        }
        // vCPUs notice the throttle when they leave KVM_RUN; a guest that rarely exits (or
        // halts in the kernel) is kicked out every slice.
        let threads: Vec<libc::pthread_t> = self
            .vcpus
            .iter()
            .filter_map(|v| v.thread.as_ref().map(|t| t.as_pthread_t()))
            .collect();
        let throttle = self.throttle.clone();
        self.throttle_ticker = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || {
                while throttle.load(Ordering::Relaxed) != 0 {
                    for &t in &threads {
                        // SAFETY: the vCPU threads are not joined while the ticker runs
                        // (set_throttle(0) joins the ticker first), so each pthread_t is live.
                        unsafe { libc::pthread_kill(t, vcpu::kick_signal()) };
                    }
                    std::thread::sleep(vcpu::THROTTLE_SLICE / 2);
                }
            })
            .ok();
    }

    /// The vCPU threads yield the CPU to other threads of this host (`by` more nice) until
    /// [`Self::unyield_vcpus`] or a pause: a migration's own threads then run ahead of the
    /// guest they move when cores are short. Returns the vCPUs' nice value from now.
    pub fn yield_vcpus(&mut self, by: i32) -> Result<i32, PriorityError> {
        self.unyield_vcpus();
        let lowered = priority::lower(&self.vcpu_tids(), by)?;
        let nice = lowered.nice().unwrap_or(0);
        self.yielded = Some(lowered);
        Ok(nice)
    }

    /// The vCPU threads go first while they stop or give their state (the downtime waits for
    /// them, behind every other guest's vCPUs on a busy host), until the guard drops; None
    /// where this process may not.
    fn vcpus_first(&self) -> Option<priority::Boosted> {
        priority::boost(&self.vcpu_tids())
            .inspect_err(|e| tracing::debug!("the vCPUs keep their class while they stop: {e}"))
            .ok()
    }

    /// The vCPU threads just spawned go first until they wait, paused (a restored VM's
    /// downtime waits for them, behind every other guest's vCPUs on a busy host); they run
    /// no guest code meanwhile. None where this process may not. The guard must drop before
    /// any vCPU thread is joined: only `start_vcpus` takes it, and drops it as it returns.
    fn starting_first(&self) -> Option<priority::BoostedSpawned> {
        use std::os::unix::thread::JoinHandleExt;
        let threads: Vec<_> = self
            .vcpus
            .iter()
            .filter_map(|v| v.thread.as_ref().map(JoinHandleExt::as_pthread_t))
            .collect();
        // SAFETY: the handles stay in `self.vcpus`, unjoined, while the guard lives: its only
        // taker, `start_vcpus`, joins nothing and drops it before returning.
        unsafe { priority::boost_spawned(&threads) }
            .inspect_err(|e| tracing::debug!("the vCPUs start time-shared: {e}"))
            .ok()
    }

    /// The kernel ids of the vCPU threads that have started.
    fn vcpu_tids(&self) -> Vec<Tid> {
        self.vcpus
            .iter()
            .map(|v| v.tid.load(Ordering::Relaxed))
            .filter(|&t| t != 0)
            .collect()
    }

    /// The vCPUs get the priority back that [`Self::yield_vcpus`] took.
    pub fn unyield_vcpus(&mut self) {
        if let Some(l) = self.yielded.take() {
            l.restore();
        }
    }

    pub fn pause(&mut self) -> Result<(), VmError> {
        self.set_throttle(0);
        // A paused guest's last pages should not wait for vCPUs to get a slice to stop.
        self.unyield_vcpus();
        match self.poll() {
            RunState::Paused => return Ok(()),
            RunState::Stopped => {
                return Err(VmError::Stopped(
                    self.stop_reason.clone().unwrap_or_default(),
                ))
            }
            RunState::Running => {}
        }
        let t = std::time::Instant::now();
        let first = self.vcpus_first();
        for v in &self.vcpus {
            let _ = v.requests.send(VcpuRequest::Pause);
            if let Some(t) = &v.thread {
                let _ = t.kill(vcpu::kick_signal());
            }
        }
        self.wait_all(|e| matches!(e, VcpuEvent::Paused(_)), "pause")?;
        drop(first);
        self.state = RunState::Paused;
        let vcpus_us = t.elapsed().as_micros();
        // The guest is still: the devices finish what it asked of them.
        self.devices.pause()?;
        tracing::debug!(
            vcpus_us,
            devices_us = t.elapsed().as_micros() - vcpus_us,
            "paused: vCPUs stopped, devices drained and flushed"
        );
        Ok(())
    }

    pub fn resume(&mut self) -> Result<(), VmError> {
        match self.poll() {
            RunState::Running => return Ok(()),
            RunState::Stopped => {
                return Err(VmError::Stopped(
                    self.stop_reason.clone().unwrap_or_default(),
                ))
            }
            RunState::Paused => {}
        }
        // The devices hold their disks again before any vCPU runs.
        self.devices.resume()?;
        for v in &self.vcpus {
            let _ = v.requests.send(VcpuRequest::Resume);
        }
        self.wait_all(|e| matches!(e, VcpuEvent::Resumed(_)), "resume")?;
        self.state = RunState::Running;
        Ok(())
    }

    /// Captures everything but RAM. The VM must be paused.
    pub fn capture(&mut self) -> Result<VmState, VmError> {
        if self.poll() != RunState::Paused {
            return Err(VmError::NotPaused(self.state));
        }
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        // Held until the vCPUs have all answered.
        let _first = self.vcpus_first();
        for v in &self.vcpus {
            let (tx, rx) = channel();
            let _ = v.requests.send(VcpuRequest::Capture(tx));
            let s = rx
                .recv_timeout(PAUSE_TIMEOUT)
                .map_err(|_| VmError::VcpuTimeout(v.id, "capture"))??;
            vcpus.push(s);
        }
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.kvm_vm
                .fd
                .get_irqchip(&mut c)
                .map_err(kvm_op("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        Ok(VmState {
            config: self.config.clone(),
            vcpus,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.kvm_vm.fd.get_pit2().map_err(kvm_op("KVM_GET_PIT2"))?,
            clock: self
                .kvm_vm
                .fd
                .get_clock()
                .map_err(kvm_op("KVM_GET_CLOCK"))?,
            uart: self.io.uart_state(),
            guest: self.io.status.report(),
            skipped: self.skipped.clone(),
            devices: self.devices.snapshot()?,
        })
    }

    pub fn status(&mut self) -> VmStatus {
        let state = self.poll();
        let guest = self.io.status.report();
        VmStatus {
            state,
            vcpus: self.config.vcpus,
            memory_bytes: self.config.memory,
            resident_bytes: self.kvm_vm.ram.resident_bytes().unwrap_or(0),
            heartbeat: guest.heartbeat,
            last_verify: guest.last_verify,
            guest,
            stop_reason: self.stop_reason.clone(),
            devices: self.devices.status(),
        }
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    pub fn ram(&self) -> &GuestRam {
        &self.kvm_vm.ram
    }

    /// Guest RAM, shareable with threads that outlive a lock on the VM (migration).
    pub fn ram_arc(&self) -> Arc<GuestRam> {
        self.kvm_vm.ram.clone()
    }

    /// The VM's dirty-page log.
    pub fn dirty_log(&self) -> Arc<std::sync::Mutex<DirtyLog>> {
        self.dirty.clone()
    }

    pub fn io(&self) -> &Arc<IoBus> {
        &self.io
    }

    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    pub fn memory_layout(&self) -> Vec<ram::RamRange> {
        layout(self.config.memory)
    }

    /// Records that the VM now runs elsewhere; `status` and the process say so.
    pub fn mark_migrated(&mut self, to: &str) {
        self.stop_reason = Some(format!("migrated to {to}"));
        self.migrated = true;
    }

    pub fn migrated(&self) -> bool {
        self.migrated
    }

    /// Stops every vCPU thread and waits for them.
    pub fn shutdown(&mut self) {
        // The ticker signals vCPU threads: it must be gone before they are joined.
        self.set_throttle(0);
        for v in &self.vcpus {
            let _ = v.requests.send(VcpuRequest::Exit);
            if let Some(t) = &v.thread {
                let _ = t.kill(vcpu::kick_signal());
            }
        }
        for v in &mut self.vcpus {
            if let Some(t) = v.thread.take() {
                let _ = t.join();
            }
        }
        self.state = RunState::Stopped;
    }
}

/// A VM under construction from saved or incoming state: RAM exists and can be filled; no
/// vCPU runs until [`PreparedVm::finish`]. Dropping it discards everything.
pub struct PreparedVm {
    parts: Parts,
}

impl PreparedVm {
    pub fn new(config: &VmConfig, net: &NetOptions) -> Result<Self, VmError> {
        Ok(PreparedVm {
            parts: build_parts(config, true, net)?,
        })
    }

    pub fn ram(&self) -> &GuestRam {
        &self.parts.vm.ram
    }

    /// Loads device and vCPU state and starts the vCPU threads.
    pub fn finish(
        self,
        state: &VmState,
        console: &Console,
        start_paused: bool,
    ) -> Result<Vm, VmError> {
        let mut p = self.parts;
        if state.vcpus.len() != state.config.vcpus as usize || p.vcpu_fds.len() != state.vcpus.len()
        {
            return Err(VmError::VcpuCount(state.vcpus.len() as u8));
        }
        let fd = &p.vm.fd;
        fd.set_pit2(&state.pit).map_err(kvm_op("KVM_SET_PIT2"))?;
        fd.set_clock(&state.clock)
            .map_err(kvm_op("KVM_SET_CLOCK"))?;
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            fd.set_irqchip(chip).map_err(kvm_op("KVM_SET_IRQCHIP"))?;
        }
        for (fd, vs) in p.vcpu_fds.iter().zip(&state.vcpus) {
            vcpu::restore(fd, vs, &p.caps)?;
        }
        p.devices.restore(&state.devices)?;
        let trigger = IrqTrigger(p.serial_irq.try_clone().map_err(VmError::EventFd)?);
        let serial = Serial::from_state(&(&state.uart).into(), trigger, NoEvents, console.open()?)
            .map_err(|e| VmError::Uart(format!("{e:?}")))?;
        let fds = std::mem::take(&mut p.vcpu_fds);
        let mut vm = Vm::assemble(p, state.config.clone(), serial)?;
        vm.io.status.load(state.guest);
        // Paused first: a resume starts the devices' I/O before any vCPU runs.
        let t = Instant::now();
        vm.start_vcpus(fds, true)?;
        tracing::debug!(
            started_ms = t.elapsed().as_millis(),
            "the vCPU threads started, paused"
        );
        if !start_paused {
            vm.resume()?;
        }
        Ok(vm)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn cause(e: impl std::error::Error + Send + Sync + 'static) -> migratable::Cause {
    Box::new(e)
}

impl migratable::Pausable for Vm {
    fn pause(&mut self) -> Result<(), MigratableError> {
        Vm::pause(self).map_err(|e| MigratableError::Pause(cause(e)))
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        Vm::resume(self).map_err(|e| MigratableError::Resume(cause(e)))
    }
}

impl migratable::Snapshottable for Vm {
    fn sections(&self) -> Vec<SectionId> {
        crate::state::sections(&self.config)
    }

    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        let state = self
            .capture()
            .map_err(|e| MigratableError::Snapshot(cause(e)))?;
        Ok(state.to_snapshot()?)
    }
}

impl migratable::Migratable for Vm {
    fn config(&self) -> VmConfig {
        self.config.clone()
    }

    fn run_state(&mut self) -> RunState {
        self.poll()
    }

    fn ram(&self) -> Arc<GuestRam> {
        self.ram_arc()
    }

    fn dirty_log(&self) -> Arc<std::sync::Mutex<dyn migratable::DirtyLog>> {
        self.dirty.clone()
    }

    fn throttle(&mut self, pct: u8) {
        self.set_throttle(pct);
    }

    fn yield_to(&mut self, by: i32) -> Result<i32, MigratableError> {
        self.yield_vcpus(by)
            .map_err(|e| MigratableError::Priority(cause(e)))
    }

    fn unyield(&mut self) {
        self.unyield_vcpus();
    }

    fn hand_over(&mut self) -> Result<(), MigratableError> {
        self.devices
            .hand_over()
            .map_err(|e| MigratableError::HandOver(cause(e)))
    }

    fn disks(&self) -> Vec<migratable::DiskSource> {
        self.devices.disks()
    }

    fn migrated(&mut self, to: &str) {
        self.mark_migrated(to);
        self.shutdown();
    }

    fn guest_writes(&self) -> Option<migratable::WritesProbe> {
        let io = self.io.clone();
        Some(Arc::new(move |window| {
            io.status
                .mem_writes(window)
                .map(|(pages, per_s)| migratable::GuestWrites { pages, per_s })
        }))
    }

    fn verify_guest(&mut self, timeout: Duration) -> GuestVerdict {
        let st = &self.io.status;
        if st.report().ready_pages.is_none() {
            return GuestVerdict::NotVerifiable;
        }
        let disk_checks = st.report().disk.map_or(0, |d| d.checks);
        let report = st.verify(timeout);
        // A disk check of this verify came before its memory verdict.
        let disk = report
            .and_then(|r| r.disk)
            .filter(|d| d.checks > disk_checks)
            .and_then(|d| d.last_check);
        match report.and_then(|r| r.last_verify) {
            Some(VerifyResult::Ok { .. }) if disk.is_some_and(|d| d.bad() > 0) => {
                let d = disk.unwrap_or_default();
                GuestVerdict::DiskCorrupt {
                    lost: d.lost,
                    stale: d.stale,
                    torn: d.torn,
                }
            }
            Some(VerifyResult::Ok { pages }) => GuestVerdict::Verified {
                pages,
                disk_blocks: disk.map(|d| d.checked),
            },
            Some(VerifyResult::Bad { first_bad_addr }) => GuestVerdict::Corrupt { first_bad_addr },
            None => GuestVerdict::NoAnswer,
        }
    }
}

/// Builds KVM VMs for incoming migrations, their consoles going to `console`.
pub struct KvmFactory {
    pub console: Console,
    /// How this host sets up an arriving VM's NICs.
    pub net: NetOptions,
    /// The directories an arriving VM's disks may be in.
    pub storage: Vec<std::path::PathBuf>,
    /// CPU features this host does not offer (`--cpu-features -avx2`).
    pub cpu_mask: Vec<String>,
}

/// A KVM VM being built for an incoming migration.
pub struct Prepared {
    vm: PreparedVm,
    config: VmConfig,
    console: Console,
}

impl migratable::VmFactory for KvmFactory {
    type Prepared = Prepared;

    fn prepare(
        &self,
        config: &VmConfig,
        sections: &[SectionId],
    ) -> Result<Prepared, MigratableError> {
        migratable::check_sections(&crate::state::sections(config), sections)?;
        config
            .check_disks_within(&self.storage)
            .map_err(|e| MigratableError::Build(cause(e)))?;
        let offered =
            host_cpu_features(&self.cpu_mask).map_err(|e| MigratableError::Build(cause(e)))?;
        let missing = migratable::cpu::missing(&config.cpu_features, &offered);
        if !missing.is_empty() {
            return Err(MigratableError::Build(
                format!(
                    "this host's CPU does not offer {} that the VM sees",
                    missing.join(", ")
                )
                .into(),
            ));
        }
        let vm =
            PreparedVm::new(config, &self.net).map_err(|e| MigratableError::Build(cause(e)))?;
        Ok(Prepared {
            vm,
            config: config.clone(),
            console: self.console.clone(),
        })
    }
}

impl migratable::PreparedVm for Prepared {
    type Vm = Vm;

    fn ram(&self) -> &GuestRam {
        self.vm.ram()
    }

    fn restore(self, state: &Snapshot) -> Result<Vm, MigratableError> {
        let mut state = VmState::from_snapshot(state)?;
        // A disk copied here sits at another path than on the source.
        if !state.config.same_but_disk_paths(&self.config) {
            return Err(MigratableError::Restore(
                format!(
                    "the state is for {:?}, the VM built was {:?}",
                    state.config, self.config
                )
                .into(),
            ));
        }
        state.config = self.config;
        self.vm
            .finish(&state, &self.console, true)
            .map_err(|e| MigratableError::Restore(cause(e)))
    }
}
