//! What vCPUs exit for: port I/O to the COM1 16550 (vm-superio), the guest agent ports (a
//! heartbeat, and a command/result exchange through which a guest that can verifies its own
//! memory), an isa-debug-exit compatible exit port and the PCI configuration ports; MMIO to
//! the PCI devices' BARs.
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use pci::{PciBus, CONFIG_ADDRESS};
use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// The guest agent ports' registers and values: the ABI a guest speaks to report its
/// heartbeat and answer commands (livemig's workload guest speaks it; see its `abi.h`).
pub mod abi {
    pub const PORT_HEARTBEAT: u16 = 0x510;
    pub const PORT_COMMAND: u16 = 0x511;
    pub const PORT_RESULT: u16 = 0x512;
    pub const PORT_RESULT_LO: u16 = 0x513;
    pub const PORT_RESULT_HI: u16 = 0x514;
    pub const CMD_NONE: u8 = 0;
    pub const CMD_VERIFY: u8 = 1;
    /// The same command for a guest on a VMM without these ports: a byte on COM1.
    pub const SERIAL_CMD_VERIFY: u8 = b'v';
    pub const RESULT_VERIFY_OK: u32 = 1;
    pub const RESULT_VERIFY_BAD: u32 = 2;
    pub const RESULT_PANIC: u32 = 3;
    pub const RESULT_READY: u32 = 4;
    pub const RESULT_DISK_ACKED: u32 = 5;
    pub const RESULT_DISK_LOST: u32 = 6;
    pub const RESULT_DISK_STALE: u32 = 7;
    pub const RESULT_DISK_TORN: u32 = 8;
    pub const RESULT_DISK_CHECKED: u32 = 9;
    pub const RESULT_NET: u32 = 10;
    pub const RESULT_MEM_WRITES: u32 = 11;
}

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_GSI: u32 = 4;
/// isa-debug-exit's default port, so QEMU and livemig agree.
pub const EXIT_PORT: u16 = 0xf4;

/// Raises the UART's interrupt through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type SerialDevice = Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>;

/// The UART registers as saved in a snapshot (mirror of vm-superio's SerialState).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<&SerialState> for UartState {
    fn from(s: &SerialState) -> Self {
        UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&UartState> for SerialState {
    fn from(s: &UartState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The guest's own verdict on its memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum VerifyResult {
    Ok { pages: u64 },
    Bad { first_bad_addr: u64 },
}

/// The guest's check of its disk: blocks it read back, and those that were not what the
/// device had acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCheck {
    pub checked: u64,
    pub lost: u64,
    pub stale: u64,
    pub torn: u64,
}

impl DiskCheck {
    pub fn bad(&self) -> u64 {
        self.lost + self.stale + self.torn
    }
}

/// The workload guest's disk: writes the device acknowledged, and its last check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskReport {
    pub acked_writes: u64,
    pub last_check: Option<DiskCheck>,
    pub checks: u64,
    /// The check being reported (its counts come before its total).
    #[serde(skip)]
    partial: DiskCheck,
}

/// The workload guest's NIC: frames it received and sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetReport {
    pub rx_frames: u64,
    pub tx_frames: u64,
}

/// What the workload guest has told us through its ports; survives snapshot and migration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestReport {
    pub heartbeat: u64,
    pub ready_pages: Option<u64>,
    pub last_verify: Option<VerifyResult>,
    pub verify_count: u64,
    pub panic_rip: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetReport>,
    /// Pages the workload's workers have written so far, as the guest last said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_writes: Option<u64>,
}

/// Write counts kept for the guest's rate: a minute of heartbeats at the default pace.
const WRITE_SAMPLES: usize = 256;

/// Guest status shared between vCPU threads and the API.
#[derive(Default)]
pub struct GuestStatus {
    heartbeat: AtomicU64,
    pending_command: AtomicU8,
    payload_lo: AtomicU32,
    payload_hi: AtomicU32,
    report: Mutex<GuestReport>,
    changed: Condvar,
    exit_code: Mutex<Option<u8>>,
    stop: AtomicBool,
    /// When the guest said how many pages it had written, lately (for its write rate).
    writes: Mutex<std::collections::VecDeque<(Instant, u64)>>,
}

impl GuestStatus {
    pub fn report(&self) -> GuestReport {
        let mut r = *locks::lock(&self.report);
        r.heartbeat = self.heartbeat.load(Ordering::Relaxed);
        r
    }

    pub fn load(&self, r: GuestReport) {
        self.heartbeat.store(r.heartbeat, Ordering::Relaxed);
        *locks::lock(&self.report) = r;
    }

    /// Pages the guest has written so far, and its pages written per second over about the
    /// last `window` (None until it said twice).
    pub fn mem_writes(&self, window: Duration) -> Option<(u64, Option<f64>)> {
        let w = locks::lock(&self.writes);
        // Just restored (a snapshot, a migration): what it said before, no rate yet.
        let Some(&(t1, n1)) = w.back() else {
            return locks::lock(&self.report).mem_writes.map(|n| (n, None));
        };
        let rate = w
            .iter()
            .find(|(t, _)| t1.duration_since(*t) <= window)
            .filter(|(t, _)| *t < t1)
            .map(|&(t0, n0)| n1.saturating_sub(n0) as f64 / (t1 - t0).as_secs_f64());
        Some((n1, rate))
    }

    fn wrote(&self, pages: u64) {
        let mut w = locks::lock(&self.writes);
        w.push_back((Instant::now(), pages));
        while w.len() > WRITE_SAMPLES {
            w.pop_front();
        }
        drop(w);
        self.update(|r| r.mem_writes = Some(pages));
    }

    /// Asks the guest to verify its memory at its next heartbeat.
    pub fn request_verify(&self) {
        self.pending_command
            .store(abi::CMD_VERIFY, Ordering::SeqCst);
    }

    /// Asks the guest to verify every page it wrote and waits for its verdict: the report
    /// carrying the new result, or None when none came within `timeout` (not our workload
    /// guest, or a guest that does not run).
    pub fn verify(&self, timeout: Duration) -> Option<GuestReport> {
        let before = self.report().verify_count;
        self.request_verify();
        self.wait_for(timeout, |r| r.verify_count > before)
    }

    /// Waits until `pred` holds for the report, or the timeout passes.
    pub fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&GuestReport) -> bool,
    ) -> Option<GuestReport> {
        let deadline = Instant::now() + timeout;
        let mut g = locks::lock(&self.report);
        loop {
            let mut r = *g;
            r.heartbeat = self.heartbeat.load(Ordering::Relaxed);
            if pred(&r) {
                return Some(r);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = locks::wait_timeout(
                &self.changed,
                g,
                (deadline - now).min(Duration::from_millis(50)),
            );
        }
    }

    pub fn exit_code(&self) -> Option<u8> {
        *locks::lock(&self.exit_code)
    }

    fn update(&self, f: impl FnOnce(&mut GuestReport)) {
        f(&mut locks::lock(&self.report));
        self.changed.notify_all();
    }
}

/// All port I/O and MMIO the vCPUs exit for.
pub struct IoBus {
    pub serial: Mutex<SerialDevice>,
    pub status: GuestStatus,
    pci: Arc<PciBus>,
    console_failed: AtomicBool,
}

impl IoBus {
    pub fn new(serial: SerialDevice, pci: Arc<PciBus>) -> Self {
        IoBus {
            serial: Mutex::new(serial),
            status: GuestStatus::default(),
            pci,
            console_failed: AtomicBool::new(false),
        }
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.pci.mmio_read(addr, data) {
            tracing::trace!("read of unclaimed MMIO {addr:#x}");
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if !self.pci.mmio_write(addr, data) {
            tracing::trace!("write to unclaimed MMIO {addr:#x}");
        }
    }

    pub fn uart_state(&self) -> UartState {
        UartState::from(&locks::lock(&self.serial).state())
    }

    pub fn stop_requested(&self) -> bool {
        self.status.stop.load(Ordering::Relaxed)
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        let word = || {
            let mut b = [0u8; 4];
            let n = data.len().min(4);
            b[..n].copy_from_slice(&data[..n]);
            u32::from_le_bytes(b)
        };
        match port {
            COM1_BASE..=0x3ff => {
                let mut s = locks::lock(&self.serial);
                // A console that went away (closed pipe, full disk) must not stop the guest;
                // say so once.
                if let Err(e) = s.write((port - COM1_BASE) as u8, data[0]) {
                    if !self.console_failed.swap(true, Ordering::Relaxed) {
                        tracing::warn!("COM1 output is being dropped: {e:?}");
                    }
                }
                if port == COM1_BASE && data[0] == b'\n' {
                    let _ = s.writer_mut().flush();
                }
            }
            abi::PORT_HEARTBEAT => {
                let s = &self.status;
                // The counter is 32-bit on the wire; keep ours monotonic across wraps.
                let prev = s.heartbeat.load(Ordering::Relaxed);
                let lo = word() as u64;
                let mut hb = (prev & !0xffff_ffff) | lo;
                if hb < prev {
                    hb += 1 << 32;
                }
                s.heartbeat.store(hb, Ordering::Relaxed);
                s.changed.notify_all();
            }
            abi::PORT_RESULT_LO => self.status.payload_lo.store(word(), Ordering::SeqCst),
            abi::PORT_RESULT_HI => self.status.payload_hi.store(word(), Ordering::SeqCst),
            abi::PORT_RESULT => {
                let s = &self.status;
                let payload = (s.payload_hi.load(Ordering::SeqCst) as u64) << 32
                    | s.payload_lo.load(Ordering::SeqCst) as u64;
                match word() {
                    abi::RESULT_VERIFY_OK => s.update(|r| {
                        r.last_verify = Some(VerifyResult::Ok { pages: payload });
                        r.verify_count += 1;
                    }),
                    abi::RESULT_VERIFY_BAD => s.update(|r| {
                        r.last_verify = Some(VerifyResult::Bad {
                            first_bad_addr: payload,
                        });
                        r.verify_count += 1;
                    }),
                    abi::RESULT_PANIC => s.update(|r| r.panic_rip = Some(payload)),
                    abi::RESULT_READY => s.update(|r| r.ready_pages = Some(payload)),
                    abi::RESULT_DISK_ACKED => {
                        s.update(|r| r.disk.get_or_insert_default().acked_writes = payload)
                    }
                    abi::RESULT_DISK_LOST => {
                        s.update(|r| r.disk.get_or_insert_default().partial.lost = payload)
                    }
                    abi::RESULT_DISK_STALE => {
                        s.update(|r| r.disk.get_or_insert_default().partial.stale = payload)
                    }
                    abi::RESULT_DISK_TORN => {
                        s.update(|r| r.disk.get_or_insert_default().partial.torn = payload)
                    }
                    abi::RESULT_DISK_CHECKED => s.update(|r| {
                        let d = r.disk.get_or_insert_default();
                        let check = DiskCheck {
                            checked: payload,
                            ..std::mem::take(&mut d.partial)
                        };
                        d.last_check = Some(check);
                        d.checks += 1;
                    }),
                    abi::RESULT_NET => s.update(|r| {
                        r.net = Some(NetReport {
                            rx_frames: payload & 0xffff_ffff,
                            tx_frames: payload >> 32,
                        })
                    }),
                    abi::RESULT_MEM_WRITES => s.wrote(payload),
                    other => tracing::debug!("unknown guest result code {other}"),
                }
            }
            CONFIG_ADDRESS..=0xcff => self.pci.pio_write(port, data),
            EXIT_PORT => {
                *locks::lock(&self.status.exit_code) = Some(data[0]);
                self.status.stop.store(true, Ordering::SeqCst);
            }
            _ => tracing::trace!("write to unclaimed port {port:#x}"),
        }
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            COM1_BASE..=0x3ff => {
                data[0] = locks::lock(&self.serial).read((port - COM1_BASE) as u8);
            }
            CONFIG_ADDRESS..=0xcff => self.pci.pio_read(port, data),
            abi::PORT_COMMAND => {
                data[0] = self
                    .status
                    .pending_command
                    .swap(abi::CMD_NONE, Ordering::SeqCst)
            }
            _ => data.fill(0xff),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus() -> (IoBus, std::sync::Arc<Mutex<Vec<u8>>>) {
        #[derive(Clone)]
        struct Sink(std::sync::Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = std::sync::Arc::new(Mutex::new(Vec::new()));
        let trig = IrqTrigger(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let serial = Serial::new(trig, Box::new(Sink(out.clone())) as Box<dyn Write + Send>);
        (IoBus::new(serial, Arc::new(PciBus::new())), out)
    }

    #[test]
    fn uart_output_and_state_round_trip() {
        let (b, out) = bus();
        for c in b"hi\n" {
            b.pio_write(COM1_BASE, &[*c]);
        }
        b.pio_write(COM1_BASE + 7, &[0x5a]);
        assert_eq!(&*out.lock().unwrap(), b"hi\n");
        let st = b.uart_state();
        assert_eq!(st.scratch, 0x5a);
        let back = UartState::from(&SerialState::from(&st));
        assert_eq!(back, st);
    }

    #[test]
    fn guest_ports_update_the_report() {
        let (b, _) = bus();
        b.pio_write(abi::PORT_HEARTBEAT, &7u32.to_le_bytes());
        b.pio_write(abi::PORT_RESULT_LO, &42u32.to_le_bytes());
        b.pio_write(abi::PORT_RESULT_HI, &0u32.to_le_bytes());
        b.pio_write(abi::PORT_RESULT, &abi::RESULT_VERIFY_OK.to_le_bytes());
        let r = b.status.report();
        assert_eq!(r.heartbeat, 7);
        assert_eq!(r.last_verify, Some(VerifyResult::Ok { pages: 42 }));
        let mut cmd = [0u8];
        b.pio_read(abi::PORT_COMMAND, &mut cmd);
        assert_eq!(cmd[0], abi::CMD_NONE);
        b.status.request_verify();
        b.pio_read(abi::PORT_COMMAND, &mut cmd);
        assert_eq!(cmd[0], abi::CMD_VERIFY);
        b.pio_read(abi::PORT_COMMAND, &mut cmd);
        assert_eq!(cmd[0], abi::CMD_NONE, "a command is delivered once");
    }

    #[test]
    fn heartbeat_stays_monotonic_across_32bit_wrap() {
        let (b, _) = bus();
        b.pio_write(abi::PORT_HEARTBEAT, &u32::MAX.to_le_bytes());
        b.pio_write(abi::PORT_HEARTBEAT, &0u32.to_le_bytes());
        assert_eq!(b.status.report().heartbeat, 1 << 32);
    }
}
