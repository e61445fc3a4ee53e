//! What this host can give a VM: memory it has free now, CPUs it has. Read before a VM is
//! built for a peer, so a VM that does not fit is refused before anything is allocated.
use crate::state::VmConfig;

/// MemAvailable from /proc/meminfo, in bytes.
pub fn mem_available() -> Option<u64> {
    parse_mem_available(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// MemTotal from /proc/meminfo, in bytes.
pub fn mem_total() -> Option<u64> {
    meminfo_field(&std::fs::read_to_string("/proc/meminfo").ok()?, "MemTotal:")
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    meminfo_field(meminfo, "MemAvailable:")
}

fn meminfo_field(meminfo: &str, field: &str) -> Option<u64> {
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib << 10)
}

/// Online CPUs.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Memory the host keeps for itself: a VM that would leave less is refused.
pub const RESERVE: u64 = 256 << 20;

/// Whether a VM of this shape fits here now, beside `committed` bytes promised to VMs still
/// arriving; the reason if not.
pub fn can_hold(vm: &VmConfig, committed: u64) -> Result<(), String> {
    if vm.vcpus == 0 || vm.vcpus > crate::vm::MAX_VCPUS {
        return Err(format!(
            "{} vCPUs: this VMM runs 1 to {}",
            vm.vcpus,
            crate::vm::MAX_VCPUS
        ));
    }
    let free = mem_available().unwrap_or(0);
    let room = free.saturating_sub(RESERVE).saturating_sub(committed);
    if vm.memory > room {
        return Err(format!(
            "a {} MiB VM does not fit: {} MiB free, {} MiB promised to incoming VMs, {} MiB kept for the host",
            vm.memory >> 20,
            free >> 20,
            committed >> 20,
            RESERVE >> 20
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parses_and_huge_vms_do_not_fit() {
        let text = "MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_mem_available(text), Some(20_000_000 << 10));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        let huge = VmConfig {
            memory: 1 << 40,
            vcpus: 2,
        };
        assert!(can_hold(&huge, 0).unwrap_err().contains("does not fit"));
        let many = VmConfig {
            memory: 64 << 20,
            vcpus: 200,
        };
        assert!(can_hold(&many, 0).unwrap_err().contains("vCPUs"));
        let small = VmConfig {
            memory: 64 << 20,
            vcpus: 1,
        };
        assert!(can_hold(&small, 0).is_ok());
        assert!(
            can_hold(&small, u64::MAX / 2).is_err(),
            "promised memory counts"
        );
    }
}
