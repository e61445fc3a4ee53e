//! An in-memory VM for the engine's tests: no KVM, no vCPUs. Its "guest" is a thread that
//! writes pages on a schedule, each stamped with its page number and a generation, and logs
//! its writes in a dirty bitmap as a hypervisor would (after the write, so that a page read
//! after its bit was cleared is either already new or dirty again). Its state section is the
//! table of generations, so the VM built on the destination can check every page itself, as
//! livemig's workload guest does.
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use migratable::{
    DirtyBitmap, DirtyLog, DirtyLogError, GuestRam, GuestVerdict, Migratable, MigratableError,
    Pausable, PreparedVm, RunState, SectionId, Snapshot, Snapshottable, VmConfig, VmFactory,
    PAGE_SIZE,
};

pub const PAGE: usize = PAGE_SIZE as usize;

/// What a page holds at generation `gen`: its page number and generation in its first 16
/// bytes, then bytes derived from both (compressible when `text`), so a page that is stale,
/// misplaced or torn is caught.
pub fn content(page: u64, gen: u32, text: bool) -> Vec<u8> {
    let mut p = vec![0u8; PAGE];
    p[..8].copy_from_slice(&page.to_le_bytes());
    p[8..12].copy_from_slice(&gen.to_le_bytes());
    let mut x = page.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(gen);
    for (i, b) in p[16..].iter_mut().enumerate() {
        if text {
            *b = b"the quick brown fox jumps over the lazy dog "[(i + gen as usize) % 44];
        } else {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    p
}

/// How the fake guest writes.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Pages written once before the migration (the first `filled` pages of RAM).
    pub filled: u64,
    /// Pages the guest keeps writing while it runs: `hot` pages from `hot_start`.
    pub hot_start: u64,
    pub hot: u64,
    /// Pages written per second (0: none).
    pub rate: u64,
    /// Compressible pages instead of random ones.
    pub text: bool,
    /// Every `repeat`-th filled page is a copy of page 0's content (dedup finds them); 0: none.
    pub repeat: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            filled: 4096,
            hot_start: 0,
            hot: 0,
            rate: 0,
            text: false,
            repeat: 0,
        }
    }
}

/// The bitmaps of every RAM region, as the log keeps them.
struct Bits {
    maps: Vec<DirtyBitmap>,
    started: bool,
}

/// The fake's dirty log: manual protect or get-and-clear, as asked.
pub struct FakeDirty {
    bits: Arc<Mutex<Bits>>,
    manual: bool,
}

impl FakeDirty {
    fn new(ram: &GuestRam, manual: bool) -> (Self, Arc<Mutex<Bits>>) {
        let maps = ram::layout(ram.size())
            .into_iter()
            .zip(0u32..)
            .map(|(r, i)| DirtyBitmap::empty(i, r))
            .collect();
        let bits = Arc::new(Mutex::new(Bits {
            maps,
            started: false,
        }));
        (
            FakeDirty {
                bits: bits.clone(),
                manual,
            },
            bits,
        )
    }
}

impl DirtyLog for FakeDirty {
    fn start(&mut self) -> Result<(), DirtyLogError> {
        let mut b = self.bits.lock().unwrap();
        b.started = true;
        for m in &mut b.maps {
            m.bits.iter_mut().for_each(|w| *w = 0);
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtyLogError> {
        self.bits.lock().unwrap().started = false;
        Ok(())
    }

    fn is_started(&self) -> bool {
        self.bits.lock().unwrap().started
    }

    fn manual_protect(&self) -> bool {
        self.manual
    }

    fn fetch(&mut self) -> Result<Vec<DirtyBitmap>, DirtyLogError> {
        let mut b = self.bits.lock().unwrap();
        let out = b.maps.clone();
        if !self.manual {
            for m in &mut b.maps {
                m.bits.iter_mut().for_each(|w| *w = 0);
            }
        }
        Ok(out)
    }

    fn clear(&mut self, d: &DirtyBitmap) -> Result<(), DirtyLogError> {
        if !self.manual {
            return Ok(());
        }
        let mut b = self.bits.lock().unwrap();
        let m = b
            .maps
            .iter_mut()
            .find(|m| m.region == d.region)
            .ok_or(DirtyLogError::Bitmap {
                region: d.region,
                bits: d.bits.len() as u64 * 64,
            })?;
        for (w, c) in m.bits.iter_mut().zip(&d.bits) {
            *w &= !c;
        }
        Ok(())
    }
}

/// The guest's side: its generations, and whether it may run.
struct Guest {
    gens: Mutex<Vec<u32>>,
    paused: Mutex<bool>,
    parked: Condvar,
    /// True while the writer is between two writes, parked.
    idle: AtomicBool,
    stop: AtomicBool,
    throttle: AtomicU8,
    writes: AtomicU64,
}

/// The fake VM.
pub struct FakeVm {
    config: VmConfig,
    ram: Arc<GuestRam>,
    dirty: Arc<Mutex<FakeDirty>>,
    guest: Arc<Guest>,
    writer: Option<JoinHandle<()>>,
    text: bool,
    state: RunState,
    /// What the engine did to it.
    pub throttled_max: u8,
    pub yielded: bool,
    pub migrated_to: Option<String>,
    /// Sections it announces (a test may add one the destination does not know).
    pub extra_section: Option<SectionId>,
    /// The scheduling class of the thread that paused it (source) or loaded and resumed it
    /// (destination).
    pub paused_by_class: Option<i32>,
    pub resumed_by_class: Option<i32>,
}

/// The calling thread's scheduling class (without the reset-on-fork flag).
pub fn current_class() -> i32 {
    // SAFETY: sched_getscheduler reads the calling thread's class and touches no memory.
    unsafe { libc::sched_getscheduler(0) & !libc::SCHED_RESET_ON_FORK }
}

impl FakeVm {
    /// A running fake VM of `memory` bytes, its RAM filled and its guest writing as `w` says.
    pub fn start(memory: u64, w: &Workload, manual_protect: bool) -> FakeVm {
        let ram = Arc::new(GuestRam::new(memory).unwrap());
        let pages = memory / PAGE_SIZE;
        let mut gens = vec![0u32; pages as usize];
        let base = content(0, 1, w.text);
        for p in 0..w.filled.min(pages) {
            gens[p as usize] = 1;
            let c = if w.repeat > 0 && p % w.repeat == 0 {
                // Same bytes as page 0 but its own stamp would differ: keep page 0's whole.
                gens[p as usize] = u32::MAX;
                base.clone()
            } else {
                content(p, 1, w.text)
            };
            ram.write_at(p * PAGE_SIZE, &c).unwrap();
        }
        let (dirty, bits) = FakeDirty::new(&ram, manual_protect);
        let guest = Arc::new(Guest {
            gens: Mutex::new(gens),
            paused: Mutex::new(false),
            parked: Condvar::new(),
            idle: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            throttle: AtomicU8::new(0),
            writes: AtomicU64::new(0),
        });
        let writer = (w.rate > 0 && w.hot > 0).then(|| {
            let (g, r, w) = (guest.clone(), ram.clone(), w.clone());
            std::thread::spawn(move || write_loop(&g, &r, &bits, &w))
        });
        FakeVm {
            config: VmConfig::new(memory, 1),
            ram,
            dirty: Arc::new(Mutex::new(dirty)),
            guest,
            writer,
            text: w.text,
            state: RunState::Running,
            throttled_max: 0,
            yielded: false,
            migrated_to: None,
            extra_section: None,
            paused_by_class: None,
            resumed_by_class: None,
        }
    }

    /// The VM's RAM (kept by a test after the VM moved, to compare with the destination's).
    pub fn ram(&self) -> Arc<GuestRam> {
        self.ram.clone()
    }

    /// Pages the guest wrote while the VM ran.
    pub fn writes(&self) -> u64 {
        self.guest.writes.load(Ordering::Relaxed)
    }

    /// The guest's throttle now, percent.
    pub fn throttle_now(&self) -> u8 {
        self.guest.throttle.load(Ordering::Relaxed)
    }

    pub fn state(&self) -> RunState {
        self.state
    }

    /// Whether the dirty log is on.
    pub fn logging(&self) -> bool {
        self.dirty.lock().unwrap().is_started()
    }

    /// Checks every page against the generations: what the guest would verify.
    fn check(&self) -> GuestVerdict {
        let gens = self.guest.gens.lock().unwrap();
        let mut page = vec![0u8; PAGE];
        let zero = vec![0u8; PAGE];
        let base = content(0, 1, self.text);
        for (p, &g) in gens.iter().enumerate() {
            let p = p as u64;
            self.ram.read_at(p * PAGE_SIZE, &mut page).unwrap();
            let want = match g {
                0 => &zero,
                u32::MAX => &base,
                g => &content(p, g, self.text),
            };
            if page != *want {
                return GuestVerdict::Corrupt {
                    first_bad_addr: p * PAGE_SIZE,
                };
            }
        }
        GuestVerdict::Verified {
            pages: gens.iter().filter(|g| **g != 0).count() as u64,
            disk_blocks: None,
        }
    }

    fn park(&mut self) {
        *self.guest.paused.lock().unwrap() = true;
        // The writer finishes the write it is in, then parks.
        let t = Instant::now();
        while self.writer.is_some() && !self.guest.idle.load(Ordering::SeqCst) {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the fake guest never parked"
            );
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

fn write_loop(g: &Guest, ram: &GuestRam, bits: &Mutex<Bits>, w: &Workload) {
    let period = Duration::from_secs_f64(1.0 / w.rate as f64);
    let mut next = Instant::now();
    let mut i = 0u64;
    while !g.stop.load(Ordering::SeqCst) {
        {
            let mut paused = g.paused.lock().unwrap();
            while *paused && !g.stop.load(Ordering::SeqCst) {
                g.idle.store(true, Ordering::SeqCst);
                paused = g
                    .parked
                    .wait_timeout(paused, Duration::from_millis(10))
                    .unwrap()
                    .0;
            }
            if g.stop.load(Ordering::SeqCst) {
                break;
            }
            g.idle.store(false, Ordering::SeqCst);
        }
        let page = w.hot_start + i % w.hot;
        i += 1;
        let gen = {
            let mut gens = g.gens.lock().unwrap();
            let e = &mut gens[page as usize];
            *e = if *e == u32::MAX { 2 } else { *e + 1 };
            *e
        };
        ram.write_at(page * PAGE_SIZE, &content(page, gen, w.text))
            .unwrap();
        // Logged after the write, as a write fault would have it.
        {
            let mut b = bits.lock().unwrap();
            if b.started {
                b.maps.iter_mut().for_each(|m| m.mark(page * PAGE_SIZE));
            }
        }
        g.writes.fetch_add(1, Ordering::Relaxed);
        // Throttled: sleep that share of the time.
        let t = u32::from(g.throttle.load(Ordering::Relaxed));
        next += period.mul_f64(100.0 / f64::from(100 - t.min(99)));
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        } else {
            next = Instant::now();
        }
    }
    g.idle.store(true, Ordering::SeqCst);
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        self.guest.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.writer.take() {
            let _ = t.join();
        }
    }
}

impl Pausable for FakeVm {
    fn pause(&mut self) -> Result<(), MigratableError> {
        self.paused_by_class = Some(current_class());
        self.park();
        self.state = RunState::Paused;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), MigratableError> {
        self.resumed_by_class = Some(current_class());
        *self.guest.paused.lock().unwrap() = false;
        self.guest.parked.notify_all();
        self.state = RunState::Running;
        Ok(())
    }
}

const SECTION: &str = "guest-generations";

impl Snapshottable for FakeVm {
    fn sections(&self) -> Vec<SectionId> {
        let mut s = vec![SectionId::new(SECTION, 1)];
        s.extend(self.extra_section.clone());
        s
    }

    fn snapshot(&mut self) -> Result<Snapshot, MigratableError> {
        let gens = self.guest.gens.lock().unwrap().clone();
        Ok(Snapshot::node(
            "vm",
            1,
            vec![
                Snapshot::new(SECTION, 1, &(gens, self.text))?,
                Snapshot::new("config", 1, &self.config)?,
            ],
        ))
    }
}

impl Migratable for FakeVm {
    fn config(&self) -> VmConfig {
        self.config.clone()
    }

    fn run_state(&mut self) -> RunState {
        self.state
    }

    fn ram(&self) -> Arc<GuestRam> {
        self.ram.clone()
    }

    fn dirty_log(&self) -> Arc<Mutex<dyn DirtyLog>> {
        self.dirty.clone()
    }

    fn throttle(&mut self, pct: u8) {
        self.guest.throttle.store(pct.min(99), Ordering::Relaxed);
        self.throttled_max = self.throttled_max.max(pct);
    }

    fn yield_to(&mut self, _by: i32) -> Result<i32, MigratableError> {
        self.yielded = true;
        Ok(10)
    }

    fn unyield(&mut self) {
        self.yielded = false;
    }

    fn migrated(&mut self, to: &str) {
        self.park();
        self.guest.stop.store(true, Ordering::SeqCst);
        self.state = RunState::Stopped;
        self.migrated_to = Some(to.into());
    }

    fn verify_guest(&mut self, _timeout: Duration) -> GuestVerdict {
        self.check()
    }
}

/// The destination's factory: fake VMs that know `known` sections.
pub struct FakeFactory {
    pub known: Vec<SectionId>,
}

impl Default for FakeFactory {
    fn default() -> Self {
        FakeFactory {
            known: vec![SectionId::new(SECTION, 1)],
        }
    }
}

pub struct FakePrepared {
    ram: Arc<GuestRam>,
    config: VmConfig,
}

impl VmFactory for FakeFactory {
    type Prepared = FakePrepared;

    fn prepare(
        &self,
        config: &VmConfig,
        sections: &[SectionId],
    ) -> Result<FakePrepared, MigratableError> {
        migratable::check_sections(&self.known, sections)?;
        Ok(FakePrepared {
            ram: Arc::new(
                GuestRam::new(config.memory).map_err(|e| MigratableError::Build(Box::new(e)))?,
            ),
            config: config.clone(),
        })
    }
}

impl PreparedVm for FakePrepared {
    type Vm = FakeVm;

    fn ram(&self) -> &GuestRam {
        &self.ram
    }

    fn restore(self, state: &Snapshot) -> Result<FakeVm, MigratableError> {
        let (gens, text): (Vec<u32>, bool) = state.section(SECTION)?.state(1)?;
        let (dirty, _) = FakeDirty::new(&self.ram, true);
        Ok(FakeVm {
            config: self.config,
            ram: self.ram,
            dirty: Arc::new(Mutex::new(dirty)),
            guest: Arc::new(Guest {
                gens: Mutex::new(gens),
                paused: Mutex::new(true),
                parked: Condvar::new(),
                idle: AtomicBool::new(true),
                stop: AtomicBool::new(false),
                throttle: AtomicU8::new(0),
                writes: AtomicU64::new(0),
            }),
            writer: None,
            text,
            state: RunState::Paused,
            throttled_max: 0,
            yielded: false,
            migrated_to: None,
            extra_section: None,
            paused_by_class: None,
            resumed_by_class: None,
        })
    }
}
