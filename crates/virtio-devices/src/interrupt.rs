//! A device's interrupts: each queue's MSI-X vector and the configuration-change vector, as
//! the driver chose them, with the ISR bits a driver without MSI-X would read.
use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use pci::{MsiSink, Msix, NO_VECTOR};

const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

#[derive(Clone)]
pub struct Interrupt {
    msix: Arc<Mutex<Msix>>,
    sink: Arc<dyn MsiSink>,
    /// Each queue's vector, fixed when the driver activated the device.
    vectors: Arc<[u16]>,
    config_vector: Arc<AtomicU16>,
    isr: Arc<AtomicU8>,
}

impl Interrupt {
    pub(crate) fn new(
        msix: Arc<Mutex<Msix>>,
        sink: Arc<dyn MsiSink>,
        vectors: Vec<u16>,
        config_vector: Arc<AtomicU16>,
        isr: Arc<AtomicU8>,
    ) -> Self {
        Interrupt {
            msix,
            sink,
            vectors: vectors.into(),
            config_vector,
            isr,
        }
    }

    /// Queue `q` has used buffers for the driver.
    pub fn queue(&self, q: usize) {
        self.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
        let v = self.vectors.get(q).copied().unwrap_or(NO_VECTOR);
        self.raise(v);
    }

    /// The device configuration changed (a link status, an announce request).
    pub fn config(&self) {
        self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        self.raise(self.config_vector.load(Ordering::SeqCst));
    }

    fn raise(&self, vector: u16) {
        if vector != NO_VECTOR {
            locks::lock(&self.msix).trigger(vector, &*self.sink);
        }
    }
}
