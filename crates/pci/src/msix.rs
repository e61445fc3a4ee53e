//! MSI-X: the capability in configuration space, the vector table and the pending-bit array
//! in a BAR, and delivery of a vector as the MSI message its entry holds. A vector raised while
//! masked (its own mask, the function mask, or MSI-X not yet enabled) is remembered in the
//! pending bits and delivered when unmasked.
use serde::{Deserialize, Serialize};

use crate::config::ConfigSpace;

pub const MSIX_ENTRY_SIZE: u64 = 16;
/// virtio's "no vector" for a queue or the configuration change.
pub const NO_VECTOR: u16 = 0xffff;
const CAP_ID_MSIX: u8 = 0x11;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_MASKED: u32 = 1;

/// Where MSI messages go: the VM's interrupt controller.
pub trait MsiSink: Send + Sync {
    fn signal_msi(&self, addr: u64, data: u32) -> std::io::Result<()>;
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
    pub control: u32,
}

/// The table and pending bits as saved (enable and function mask live in config space).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub table: Vec<MsixEntry>,
    pub pending: Vec<bool>,
}

/// Why saved MSI-X state cannot be loaded.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum MsixError {
    /// the saved MSI-X state has {theirs} vectors, this device has {ours}
    Vectors { theirs: usize, ours: usize },
}

/// One function's MSI-X vectors.
pub struct Msix {
    table: Vec<MsixEntry>,
    pending: Vec<bool>,
    /// The capability's offset in configuration space.
    cap: usize,
    enabled: bool,
    function_masked: bool,
}

impl Msix {
    /// Adds the MSI-X capability for `vectors` vectors whose table is at `table_offset` and
    /// pending bits at `pba_offset` of BAR `bar`.
    pub fn new(
        config: &mut ConfigSpace,
        vectors: u16,
        bar: usize,
        table_offset: u32,
        pba_offset: u32,
    ) -> Self {
        assert!((1..=2048).contains(&vectors), "MSI-X has 1 to 2048 vectors");
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&(vectors - 1).to_le_bytes());
        body.extend_from_slice(&(table_offset | bar as u32).to_le_bytes());
        body.extend_from_slice(&(pba_offset | bar as u32).to_le_bytes());
        let writable = (CONTROL_ENABLE | CONTROL_FUNCTION_MASK).to_le_bytes();
        let cap = config.add_capability(CAP_ID_MSIX, &body, &writable);
        Msix {
            table: vec![
                MsixEntry {
                    control: ENTRY_MASKED,
                    ..Default::default()
                };
                vectors as usize
            ],
            pending: vec![false; vectors as usize],
            cap,
            enabled: false,
            function_masked: false,
        }
    }

    pub fn vectors(&self) -> usize {
        self.table.len()
    }

    /// Whether a configuration write at `offset` touched the message control register.
    pub fn touches_control(&self, offset: usize, len: usize) -> bool {
        offset < self.cap + 4 && offset + len > self.cap + 2
    }

    /// Takes the enable and function-mask bits from configuration space (after a guest
    /// write); vectors no longer masked deliver what they hold pending.
    pub fn control_written(&mut self, config: &ConfigSpace, sink: &dyn MsiSink) {
        let control = config.u16_at(self.cap + 2);
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        self.deliver_pending(sink);
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let words = self.table_words();
        read_words(&words, offset, data);
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8], sink: &dyn MsiSink) {
        let mut words = self.table_words();
        if !write_words(&mut words, offset, data) {
            return;
        }
        for (e, w) in self.table.iter_mut().zip(words.chunks(4)) {
            *e = MsixEntry {
                addr_lo: w[0],
                addr_hi: w[1],
                data: w[2],
                control: w[3] & ENTRY_MASKED,
            };
        }
        self.deliver_pending(sink);
    }

    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let mut words = vec![0u32; self.pending.len().div_ceil(32) * 2];
        for (i, _) in self.pending.iter().enumerate().filter(|(_, p)| **p) {
            words[i / 32] |= 1 << (i % 32);
        }
        read_words(&words, offset, data);
    }

    /// Raises `vector`: delivered now, or pending until unmasked. A vector out of range (a
    /// guest's choice) is dropped.
    pub fn trigger(&mut self, vector: u16, sink: &dyn MsiSink) {
        let v = vector as usize;
        if v >= self.table.len() {
            return;
        }
        if self.masked(v) {
            self.pending[v] = true;
            return;
        }
        self.send(v, sink);
    }

    fn masked(&self, v: usize) -> bool {
        !self.enabled || self.function_masked || self.table[v].control & ENTRY_MASKED != 0
    }

    fn send(&self, v: usize, sink: &dyn MsiSink) {
        let e = &self.table[v];
        let addr = u64::from(e.addr_hi) << 32 | u64::from(e.addr_lo);
        if let Err(err) = sink.signal_msi(addr, e.data) {
            tracing::warn!("MSI-X vector {v} (address {addr:#x}) was not delivered: {err}");
        }
    }

    fn deliver_pending(&mut self, sink: &dyn MsiSink) {
        for v in 0..self.table.len() {
            if self.pending[v] && !self.masked(v) {
                self.pending[v] = false;
                self.send(v, sink);
            }
        }
    }

    fn table_words(&self) -> Vec<u32> {
        self.table
            .iter()
            .flat_map(|e| [e.addr_lo, e.addr_hi, e.data, e.control])
            .collect()
    }

    pub fn state(&self) -> MsixState {
        MsixState {
            table: self.table.clone(),
            pending: self.pending.clone(),
        }
    }

    /// Loads saved vectors; the enable and mask bits come from the restored configuration
    /// space. Nothing is delivered until the device runs again.
    pub fn restore(&mut self, s: &MsixState, config: &ConfigSpace) -> Result<(), MsixError> {
        if s.table.len() != self.table.len() || s.pending.len() != self.pending.len() {
            return Err(MsixError::Vectors {
                theirs: s.table.len(),
                ours: self.table.len(),
            });
        }
        self.table = s.table.clone();
        for e in &mut self.table {
            e.control &= ENTRY_MASKED;
        }
        self.pending = s.pending.clone();
        let control = config.u16_at(self.cap + 2);
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        Ok(())
    }
}

/// Reads an aligned dword or qword of `words` at byte `offset`; anything else reads as zero.
fn read_words(words: &[u32], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let aligned = offset.is_multiple_of(data.len().max(1) as u64) && matches!(data.len(), 4 | 8);
    let i = (offset / 4) as usize;
    if !aligned || i + data.len() / 4 > words.len() {
        return;
    }
    for (k, chunk) in data.chunks_mut(4).enumerate() {
        chunk.copy_from_slice(&words[i + k].to_le_bytes());
    }
}

/// Writes an aligned dword or qword into `words`; says whether it did.
fn write_words(words: &mut [u32], offset: u64, data: &[u8]) -> bool {
    let aligned = offset.is_multiple_of(data.len().max(1) as u64) && matches!(data.len(), 4 | 8);
    let i = (offset / 4) as usize;
    if !aligned || i + data.len() / 4 > words.len() {
        return false;
    }
    for (k, chunk) in data.chunks(4).enumerate() {
        words[i + k] = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Identity;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Sink(Mutex<Vec<(u64, u32)>>);
    impl MsiSink for Sink {
        fn signal_msi(&self, addr: u64, data: u32) -> std::io::Result<()> {
            self.0.lock().unwrap().push((addr, data));
            Ok(())
        }
    }

    fn setup() -> (ConfigSpace, Msix, Sink) {
        let mut c = ConfigSpace::new(Identity {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: [1, 0, 0],
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        c.add_bar(0, 0x1_0000);
        let m = Msix::new(&mut c, 3, 0, 0x8000, 0xc000);
        (c, m, Sink::default())
    }

    fn entry(m: &mut Msix, v: u64, addr: u64, data: u32, masked: bool, sink: &Sink) {
        let mut b = Vec::new();
        b.extend_from_slice(&(addr as u32).to_le_bytes());
        b.extend_from_slice(&((addr >> 32) as u32).to_le_bytes());
        b.extend_from_slice(&data.to_le_bytes());
        b.extend_from_slice(&u32::from(masked).to_le_bytes());
        for (k, w) in b.chunks(4).enumerate() {
            m.write_table(v * MSIX_ENTRY_SIZE + k as u64 * 4, w, sink);
        }
    }

    /// A vector raised before MSI-X is on, or while masked, is pending and is delivered once
    /// unmasked; the table reads back what was written.
    #[test]
    fn masked_vectors_pend_and_deliver_on_unmask() {
        let (mut c, mut m, sink) = setup();
        entry(&mut m, 1, 0xfee0_0000, 0x41, false, &sink);
        m.trigger(1, &sink);
        assert!(sink.0.lock().unwrap().is_empty(), "MSI-X is off");
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        let ctl = m.cap + 2;
        c.write(ctl, &CONTROL_ENABLE.to_le_bytes());
        assert!(m.touches_control(ctl, 2));
        m.control_written(&c, &sink);
        assert_eq!(*sink.0.lock().unwrap(), vec![(0xfee0_0000, 0x41)]);
        entry(&mut m, 2, 0xfee0_1000, 0x42, true, &sink);
        m.trigger(2, &sink);
        m.trigger(7, &sink);
        assert_eq!(sink.0.lock().unwrap().len(), 1);
        m.write_table(2 * MSIX_ENTRY_SIZE + 12, &0u32.to_le_bytes(), &sink);
        assert_eq!(sink.0.lock().unwrap()[1], (0xfee0_1000, 0x42));
        let mut w = [0u8; 4];
        m.read_table(2 * MSIX_ENTRY_SIZE + 8, &mut w);
        assert_eq!(u32::from_le_bytes(w), 0x42);
        m.read_table(3, &mut w);
        assert_eq!(w, [0; 4], "unaligned reads are zero");
    }

    #[test]
    fn state_round_trips_and_a_different_size_is_refused() {
        let (mut c, mut m, sink) = setup();
        entry(&mut m, 0, 0xfee0_0000, 0x30, true, &sink);
        m.trigger(0, &sink);
        c.write(m.cap + 2, &CONTROL_ENABLE.to_le_bytes());
        let (mut c2, mut m2, _) = setup();
        c2.restore(&c.state()).unwrap();
        m2.restore(&m.state(), &c2).unwrap();
        assert_eq!(m2.state(), m.state());
        assert!(m2.enabled());
        let mut short = m.state();
        short.table.pop();
        assert!(matches!(
            m2.restore(&short, &c2),
            Err(MsixError::Vectors { theirs: 2, ours: 3 })
        ));
    }
}
