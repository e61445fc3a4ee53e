//! The livemig workload guest: a small PVH kernel (kernel/, built by build.rs with the host C
//! toolchain) that dirties memory at a paced rate, stamps what it writes so it can verify it,
//! and prints a heartbeat on COM1. This crate carries the image, its port ABI and the typed
//! workload description that becomes its command line.
use std::fmt::Write as _;

pub mod memory_profile;

/// The PVH ELF image of the workload guest.
pub const WORKLOAD_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/workload.elf"));

/// I/O ports the guest uses to talk to its VMM (mirror of kernel/abi.h).
pub mod abi {
    pub const PORT_HEARTBEAT: u16 = 0x510;
    pub const PORT_COMMAND: u16 = 0x511;
    pub const PORT_RESULT: u16 = 0x512;
    pub const PORT_RESULT_LO: u16 = 0x513;
    pub const PORT_RESULT_HI: u16 = 0x514;
    pub const CMD_NONE: u8 = 0;
    pub const CMD_VERIFY: u8 = 1;
    pub const SERIAL_CMD_VERIFY: u8 = b'v';
    pub const RESULT_VERIFY_OK: u32 = 1;
    pub const RESULT_VERIFY_BAD: u32 = 2;
    pub const RESULT_PANIC: u32 = 3;
    pub const RESULT_READY: u32 = 4;
    /// The header the constants above mirror.
    pub const HEADER: &str = include_str!("../kernel/abi.h");
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WorkloadError {
    #[error("unknown workload preset {0:?} (expected idle, web, sql or stress)")]
    UnknownPreset(String),
    #[error("unknown workload key {0:?} (expected ws, wsoff, pattern, rate, style, burst, workers, hot, hotw, seed, hb_ms, disk, disk_blocks, ip)")]
    UnknownKey(String),
    #[error("bad value {value:?} for workload key {key}: {why}")]
    BadValue {
        key: String,
        value: String,
        why: &'static str,
    },
    #[error("workload item {0:?} is neither a preset name nor key=value")]
    BadItem(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Page after page, wrapping around.
    Seq,
    /// Uniformly random pages.
    Uniform,
    /// Hot/cold: `hot_write_pct`% of writes go to the first `hot_pct`% of the working set.
    Zipf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rate {
    /// Pages per second, summed over all workers, paced by the TSC.
    PagesPerSec(u64),
    /// As fast as the vCPUs can write.
    Max,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Style {
    /// One stamped word per page write.
    Word,
    /// This many stamped words per page write.
    Burst(u32),
}

/// What the workload guest does; rendered onto its PVH command line.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkloadSpec {
    pub preset: Option<String>,
    pub ws_bytes: u64,
    pub ws_offset: u64,
    pub pattern: Pattern,
    pub rate: Rate,
    pub style: Style,
    /// Worker vCPUs; None = every vCPU.
    pub workers: Option<u32>,
    pub hot_pct: u32,
    pub hot_write_pct: u32,
    pub seed: u64,
    pub heartbeat_ms: u64,
    /// Stamped block writes a second to the VM's first disk (0: none).
    #[serde(default)]
    pub disk_rate: u64,
    /// 4 KiB blocks of the disk it writes over (default: 4096, or fewer on a small disk).
    #[serde(default)]
    pub disk_blocks: Option<u64>,
    /// The address its first NIC answers ARP, ICMP echo and UDP echo on: `A.B.C.D/N`.
    #[serde(default)]
    pub ip: Option<String>,
}

/// The most disk blocks the guest tracks (4 bytes each in its RAM).
pub const MAX_DISK_BLOCKS: u64 = 1 << 20;

pub const PRESETS: [&str; 4] = ["idle", "web", "sql", "stress"];

/// RAM the guest takes for itself below its working set, at most: its image (from 1 MiB),
/// page tables, vCPU stacks and 2 MiB alignments (the page generation table comes on top).
const GUEST_OWN_BYTES: u64 = 16 << 20;

impl WorkloadSpec {
    /// How much RAM from the bottom (not counting holes) the guest writes, at most: its own
    /// memory, the generation table of its working set (4 bytes a page), the offset and the
    /// working set.
    pub fn written_bytes(&self) -> u64 {
        GUEST_OWN_BYTES
            + self.disk_blocks.unwrap_or(4096) * 4
            + self.ws_bytes / 1024
            + self.ws_offset
            + self.ws_bytes
    }

    /// A named preset sized for a VM of `memory` bytes.
    pub fn preset(name: &str, memory: u64) -> Result<Self, WorkloadError> {
        let pages = memory / 4096;
        let base = WorkloadSpec {
            preset: Some(name.to_string()),
            ws_bytes: memory / 2,
            ws_offset: 0,
            pattern: Pattern::Zipf,
            rate: Rate::PagesPerSec(pages / 20),
            style: Style::Word,
            workers: None,
            hot_pct: 10,
            hot_write_pct: 90,
            seed: 1,
            heartbeat_ms: 250,
            disk_rate: 0,
            disk_blocks: None,
            ip: None,
        };
        Ok(match name {
            "idle" => WorkloadSpec {
                ws_bytes: (4 << 20).min(memory / 16),
                pattern: Pattern::Uniform,
                rate: Rate::PagesPerSec(10),
                ..base
            },
            "web" => WorkloadSpec {
                ws_bytes: memory / 20,
                rate: Rate::PagesPerSec(pages / 100),
                ..base
            },
            // Large buffer pool, zipf hot set, ~5% of RAM written per second.
            "sql" => base,
            // Dirties faster than a 1 GbE link carries (~30k pages/s).
            "stress" => WorkloadSpec {
                pattern: Pattern::Uniform,
                rate: Rate::Max,
                ..base
            },
            other => return Err(WorkloadError::UnknownPreset(other.to_string())),
        })
    }

    /// `PRESET`, `PRESET,key=value,...` or `key=value,...` (defaults from `sql`).
    pub fn parse(s: &str, memory: u64) -> Result<Self, WorkloadError> {
        let mut items = s
            .split(',')
            .map(str::trim)
            .filter(|i| !i.is_empty())
            .peekable();
        let mut spec = match items.peek() {
            Some(first) if !first.contains('=') => {
                let p = Self::preset(first, memory)?;
                items.next();
                p
            }
            _ => {
                let mut p = Self::preset("sql", memory)?;
                p.preset = None;
                p
            }
        };
        for item in items {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| WorkloadError::BadItem(item.to_string()))?;
            spec.set(k, v, memory)?;
        }
        Ok(spec)
    }

    fn set(&mut self, key: &str, value: &str, memory: u64) -> Result<(), WorkloadError> {
        let bad = |why| WorkloadError::BadValue {
            key: key.to_string(),
            value: value.to_string(),
            why,
        };
        let num =
            || parse_size(value).ok_or_else(|| bad("expected a number (K/M/G suffix allowed)"));
        let pct = || -> Result<u32, WorkloadError> {
            match value.parse::<u32>() {
                Ok(n) if n <= 100 => Ok(n),
                _ => Err(bad("expected a percentage 0..=100")),
            }
        };
        match key {
            "ws" => {
                self.ws_bytes = match value.strip_suffix('%') {
                    Some(p) => match p.parse::<u64>() {
                        Ok(p) if p <= 100 => memory * p / 100,
                        _ => return Err(bad("expected a percentage of RAM 0..=100")),
                    },
                    None => num()?,
                }
            }
            "wsoff" => self.ws_offset = num()?,
            "pattern" => {
                self.pattern = match value {
                    "seq" => Pattern::Seq,
                    "uniform" => Pattern::Uniform,
                    "zipf" => Pattern::Zipf,
                    _ => return Err(bad("expected seq, uniform or zipf")),
                }
            }
            "rate" => {
                self.rate = if value == "max" {
                    Rate::Max
                } else {
                    Rate::PagesPerSec(num()?)
                }
            }
            "style" => {
                self.style = match value {
                    "word" => Style::Word,
                    "burst" => Style::Burst(64),
                    _ => return Err(bad("expected word or burst")),
                }
            }
            "burst" => match num()? {
                n @ 1..=512 => self.style = Style::Burst(n as u32),
                _ => return Err(bad("expected 1..=512 words")),
            },
            "workers" => match num()? {
                n @ 1..=64 => self.workers = Some(n as u32),
                _ => return Err(bad("expected 1..=64")),
            },
            "hot" => self.hot_pct = pct()?.max(1),
            "hotw" => self.hot_write_pct = pct()?,
            "seed" => self.seed = num()?,
            "hb_ms" => match num()? {
                n @ 10..=60_000 => self.heartbeat_ms = n,
                _ => return Err(bad("expected 10..=60000 ms")),
            },
            "disk" => self.disk_rate = num()?,
            "disk_blocks" => match num()? {
                n @ 1..=MAX_DISK_BLOCKS => self.disk_blocks = Some(n),
                _ => return Err(bad("expected 1..=1048576 blocks")),
            },
            "ip" => {
                parse_ipv4_net(value).ok_or_else(|| bad("expected A.B.C.D/N with N in 1..=30"))?;
                self.ip = Some(value.to_string());
            }
            other => return Err(WorkloadError::UnknownKey(other.to_string())),
        }
        Ok(())
    }

    /// The guest's command line. `tsc_khz` spares the guest its PIT calibration.
    pub fn cmdline(&self, vcpus: u32, tsc_khz: Option<u32>) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "ws={} wsoff={} pattern={} rate={} style={}",
            self.ws_bytes,
            self.ws_offset,
            match self.pattern {
                Pattern::Seq => "seq",
                Pattern::Uniform => "uniform",
                Pattern::Zipf => "zipf",
            },
            match self.rate {
                Rate::Max => "max".to_string(),
                Rate::PagesPerSec(n) => n.to_string(),
            },
            match self.style {
                Style::Word => "word",
                Style::Burst(_) => "burst",
            }
        );
        if let Style::Burst(n) = self.style {
            let _ = write!(s, " burst={n}");
        }
        let workers = self.workers.unwrap_or(vcpus).min(vcpus);
        let _ = write!(
            s,
            " vcpus={vcpus} workers={workers} hot={} hotw={} seed={} hb_ms={}",
            self.hot_pct, self.hot_write_pct, self.seed, self.heartbeat_ms
        );
        if self.disk_rate > 0 {
            let _ = write!(s, " disk={}", self.disk_rate);
        }
        if let Some(n) = self.disk_blocks {
            let _ = write!(s, " disk_blocks={n}");
        }
        if let Some(ip) = &self.ip {
            let _ = write!(s, " ip={ip}");
        }
        if let Some(khz) = tsc_khz {
            let _ = write!(s, " tsc_khz={khz}");
        }
        s
    }
}

/// `A.B.C.D/N`: the address and prefix length (1..=30).
pub fn parse_ipv4_net(s: &str) -> Option<(std::net::Ipv4Addr, u8)> {
    let (a, n) = s.split_once('/')?;
    let n: u8 = n.parse().ok().filter(|n| (1..=30).contains(n))?;
    Some((a.parse().ok()?, n))
}

/// `123`, `64K`, `512M`, `2G` (powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 10),
        (i, 'M' | 'm') => (&s[..i], 20),
        (i, 'G' | 'g') => (&s[..i], 30),
        (i, 'T' | 't') => (&s[..i], 40),
        _ => (s, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn abi_constants_match_the_c_header() {
        let find = |name: &str| -> u64 {
            let line = abi::HEADER
                .lines()
                .find(|l| l.starts_with(&format!("#define {name} ")))
                .unwrap_or_else(|| panic!("{name} missing from abi.h"));
            let v = line.split_whitespace().nth(2).unwrap();
            if let Some(c) = v.strip_prefix('\'').and_then(|c| c.strip_suffix('\'')) {
                return c.as_bytes()[0] as u64;
            }
            match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16).unwrap(),
                None => v.parse().unwrap(),
            }
        };
        assert_eq!(find("PORT_HEARTBEAT"), abi::PORT_HEARTBEAT as u64);
        assert_eq!(find("PORT_COMMAND"), abi::PORT_COMMAND as u64);
        assert_eq!(find("PORT_RESULT"), abi::PORT_RESULT as u64);
        assert_eq!(find("PORT_RESULT_LO"), abi::PORT_RESULT_LO as u64);
        assert_eq!(find("PORT_RESULT_HI"), abi::PORT_RESULT_HI as u64);
        assert_eq!(find("CMD_VERIFY"), abi::CMD_VERIFY as u64);
        assert_eq!(find("SERIAL_CMD_VERIFY"), abi::SERIAL_CMD_VERIFY as u64);
        assert_eq!(find("RESULT_VERIFY_OK"), abi::RESULT_VERIFY_OK as u64);
        assert_eq!(find("RESULT_VERIFY_BAD"), abi::RESULT_VERIFY_BAD as u64);
        assert_eq!(find("RESULT_PANIC"), abi::RESULT_PANIC as u64);
        assert_eq!(find("RESULT_READY"), abi::RESULT_READY as u64);
    }

    #[test]
    fn image_is_a_pvh_elf() {
        assert_eq!(&WORKLOAD_ELF[..4], b"\x7fELF");
        assert!(WORKLOAD_ELF.windows(4).any(|w| w == b"Xen\0"));
    }

    #[test]
    fn presets_scale_with_memory() {
        let sql = WorkloadSpec::preset("sql", GIB).unwrap();
        assert_eq!(sql.ws_bytes, GIB / 2);
        assert_eq!(sql.rate, Rate::PagesPerSec(GIB / 4096 / 20));
        assert_eq!(WorkloadSpec::preset("stress", GIB).unwrap().rate, Rate::Max);
        for p in PRESETS {
            WorkloadSpec::preset(p, 8 * GIB).unwrap();
        }
        assert_eq!(
            WorkloadSpec::preset("oltp", GIB),
            Err(WorkloadError::UnknownPreset("oltp".into()))
        );
    }

    #[test]
    fn parse_preset_with_overrides() {
        let s = WorkloadSpec::parse("web,rate=500,ws=25%,style=burst,workers=1", GIB).unwrap();
        assert_eq!(s.preset.as_deref(), Some("web"));
        assert_eq!(s.rate, Rate::PagesPerSec(500));
        assert_eq!(s.ws_bytes, GIB / 4);
        assert_eq!(s.style, Style::Burst(64));
        assert_eq!(s.workers, Some(1));
        let kv = WorkloadSpec::parse("ws=64M,pattern=seq,rate=max,burst=8", GIB).unwrap();
        assert_eq!(kv.preset, None);
        assert_eq!(kv.ws_bytes, 64 << 20);
        assert_eq!(kv.pattern, Pattern::Seq);
        assert_eq!(kv.rate, Rate::Max);
        assert_eq!(kv.style, Style::Burst(8));
    }

    #[test]
    fn parse_rejects_bad_input() {
        assert!(matches!(
            WorkloadSpec::parse("sql,foo=1", GIB),
            Err(WorkloadError::UnknownKey(_))
        ));
        assert!(matches!(
            WorkloadSpec::parse("sql,rate=fast", GIB),
            Err(WorkloadError::BadValue { .. })
        ));
        assert!(matches!(
            WorkloadSpec::parse("sql,hot=150", GIB),
            Err(WorkloadError::BadValue { .. })
        ));
        assert!(matches!(
            WorkloadSpec::parse("sql,stress", GIB),
            Err(WorkloadError::BadItem(_))
        ));
        assert!(matches!(
            WorkloadSpec::parse("sql,burst=0", GIB),
            Err(WorkloadError::BadValue { .. })
        ));
    }

    #[test]
    fn cmdline_round_trips_every_field() {
        let s = WorkloadSpec::parse(
            "stress,burst=16,workers=8,seed=9,hb_ms=100,disk=50,disk_blocks=512,ip=10.77.9.10/24",
            GIB,
        )
        .unwrap();
        let c = s.cmdline(2, Some(2_500_000));
        assert_eq!(
            c,
            format!(
                "ws={} wsoff=0 pattern=uniform rate=max style=burst burst=16 vcpus=2 workers=2 hot=10 hotw=90 seed=9 hb_ms=100 disk=50 disk_blocks=512 ip=10.77.9.10/24 tsc_khz=2500000",
                GIB / 2
            )
        );
        // Every key the cmdline carries parses back to the same spec.
        let back: String = c
            .split(' ')
            .filter(|kv| !kv.starts_with("vcpus=") && !kv.starts_with("tsc_khz="))
            .map(|kv| {
                if kv.starts_with("workers=") {
                    "workers=8"
                } else {
                    kv
                }
            })
            .collect::<Vec<_>>()
            .join(",");
        let mut again = WorkloadSpec::parse(&back, GIB).unwrap();
        again.preset = s.preset.clone();
        assert_eq!(again, s);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size(""), None);
    }
}
