//! Whether this machine hands its free memory back to a hypervisor underneath it (Linux's free
//! page reporting, as a cloud VM's balloon does). Memory it reported is backed again only when
//! something touches it, and that first touch costs the toucher: a drain's destination, whose
//! writes into fresh guest memory then cost up to three times the CPU. A bench on such a
//! machine says so, and how much it reported while it ran (scripts/bench-host.sh prepares one).
use std::path::Path;

const PARAMS: &str = "/sys/module/page_reporting/parameters";

/// The kernel's free page reporting, as read once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reporting {
    /// Free blocks of this order and above are reported.
    pub order: u32,
    /// Reported since boot, KiB.
    pub reported_kib: u64,
}

impl Reporting {
    /// Reads it from sysfs; None where the kernel has none (no balloon, or too old).
    pub fn read() -> Option<Reporting> {
        Self::read_from(Path::new(PARAMS))
    }

    fn read_from(dir: &Path) -> Option<Reporting> {
        let num = |name: &str| -> Option<u64> {
            std::fs::read_to_string(dir.join(name))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        Some(Reporting {
            order: u32::try_from(num("page_reporting_order")?).ok()?,
            reported_kib: num("reported_kib")?,
        })
    }
}

/// The bench's note on what the machine reported between `before` and `after`, if anything.
pub fn note(before: Option<Reporting>, after: Option<Reporting>) -> Option<String> {
    let (b, a) = (before?, after?);
    let mib = a.reported_kib.saturating_sub(b.reported_kib) >> 10;
    if mib == 0 {
        return None;
    }
    Some(format!(
        "this machine handed {mib} MiB of free memory back to its hypervisor while the bench \
         ran (free page reporting, order {}): memory touched again after that costs whoever \
         touches it, up to three times a destination's CPU in the drains that follow the \
         guests' boot; scripts/bench-host.sh prepare stops it for a bench",
        a.order
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bench_says_how_much_free_memory_the_machine_handed_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(Reporting::read_from(dir.path()), None, "no reporting here");
        std::fs::write(dir.path().join("page_reporting_order"), "9\n").expect("write");
        std::fs::write(dir.path().join("reported_kib"), "1048576\n").expect("write");
        let before = Reporting::read_from(dir.path()).expect("reads");
        assert_eq!(
            before,
            Reporting {
                order: 9,
                reported_kib: 1 << 20
            }
        );
        assert_eq!(note(Some(before), Some(before)), None, "nothing reported");
        assert_eq!(note(None, Some(before)), None);
        let after = Reporting {
            reported_kib: before.reported_kib + (300 << 10),
            ..before
        };
        let n = note(Some(before), Some(after)).expect("a note");
        assert!(n.contains("300 MiB") && n.contains("order 9"), "{n}");
        std::fs::write(dir.path().join("reported_kib"), "lots").expect("write");
        assert_eq!(Reporting::read_from(dir.path()), None, "not a number");
    }
}
