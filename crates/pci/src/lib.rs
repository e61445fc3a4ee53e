//! A PCI bus as a VMM's firmware and chipset would present it, on configuration mechanism #1
//! (ports 0xCF8/0xCFC): a host bridge at 00:00.0 and devices in the slots after it, each a
//! type 0 configuration space ([`ConfigSpace`]) with memory BARs the VMM places in an MMIO
//! window, a capability list, and MSI-X ([`Msix`]) delivered as MSI messages through an
//! [`MsiSink`]. A stock kernel finds the devices by probing the bus, without ACPI.
mod bus;
mod config;
mod msix;

pub use bus::{BusError, PciBus, CONFIG_ADDRESS, CONFIG_DATA, MMIO_WINDOW};
pub use config::{Bar, BarState, ConfigError, ConfigSpace, ConfigState, Identity, COMMAND_MEMORY};
pub use msix::{MsiSink, Msix, MsixEntry, MsixError, MsixState, MSIX_ENTRY_SIZE, NO_VECTOR};

/// A function on the bus: its configuration space and what its BARs decode.
pub trait PciDevice: Send {
    fn config(&self) -> &ConfigSpace;
    fn config_mut(&mut self) -> &mut ConfigSpace;
    /// A configuration read: the space's bytes, unless the device answers some itself.
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    /// A configuration write of `len` bytes the device may want to see (MSI-X enable and
    /// mask); the space itself was written already.
    fn config_written(&mut self, _offset: u16, _len: usize) {}
    /// A read of `data.len()` bytes at `offset` of BAR `bar`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// BAR `bar` now decodes at `addr` (placed by the VMM, or moved by the guest): whatever
    /// depends on its address (ioeventfds) follows it.
    fn bar_placed(&mut self, _bar: usize, _addr: u64) {}
}
