//! The CPU features a guest sees, by name: what a VM's CPUID offers is fixed when it starts
//! and travels with it, and a host that cannot offer one of them may not take it (the guest
//! would fault on its first use of the instruction). Hosts offer what KVM supports there,
//! less what the operator masks (`--cpu-features -avx2`, standing for an older CPU
//! generation); a cluster's `cpu-baseline` masks what not every live host offers.
use std::collections::BTreeSet;

/// One CPUID leaf as KVM reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    pub function: u32,
    pub index: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

/// A named feature: its leaf, subleaf, register and bit (Intel SDM vol. 2A, CPUID).
struct Feature {
    name: &'static str,
    function: u32,
    index: u32,
    reg: Reg,
    bit: u8,
}

const fn f(name: &'static str, function: u32, index: u32, reg: Reg, bit: u8) -> Feature {
    Feature {
        name,
        function,
        index,
        reg,
        bit,
    }
}

/// The features a guest's code may depend on, by their Linux `/proc/cpuinfo` names.
const FEATURES: &[Feature] = &[
    f("sse3", 1, 0, Reg::Ecx, 0),
    f("pclmulqdq", 1, 0, Reg::Ecx, 1),
    f("ssse3", 1, 0, Reg::Ecx, 9),
    f("fma", 1, 0, Reg::Ecx, 12),
    f("cx16", 1, 0, Reg::Ecx, 13),
    f("sse4_1", 1, 0, Reg::Ecx, 19),
    f("sse4_2", 1, 0, Reg::Ecx, 20),
    f("movbe", 1, 0, Reg::Ecx, 22),
    f("popcnt", 1, 0, Reg::Ecx, 23),
    f("aes", 1, 0, Reg::Ecx, 25),
    f("xsave", 1, 0, Reg::Ecx, 26),
    f("avx", 1, 0, Reg::Ecx, 28),
    f("f16c", 1, 0, Reg::Ecx, 29),
    f("rdrand", 1, 0, Reg::Ecx, 30),
    f("sse", 1, 0, Reg::Edx, 25),
    f("sse2", 1, 0, Reg::Edx, 26),
    f("fsgsbase", 7, 0, Reg::Ebx, 0),
    f("bmi1", 7, 0, Reg::Ebx, 3),
    f("hle", 7, 0, Reg::Ebx, 4),
    f("avx2", 7, 0, Reg::Ebx, 5),
    f("bmi2", 7, 0, Reg::Ebx, 8),
    f("erms", 7, 0, Reg::Ebx, 9),
    f("rtm", 7, 0, Reg::Ebx, 11),
    f("avx512f", 7, 0, Reg::Ebx, 16),
    f("avx512dq", 7, 0, Reg::Ebx, 17),
    f("rdseed", 7, 0, Reg::Ebx, 18),
    f("adx", 7, 0, Reg::Ebx, 19),
    f("smap", 7, 0, Reg::Ebx, 20),
    f("clflushopt", 7, 0, Reg::Ebx, 23),
    f("clwb", 7, 0, Reg::Ebx, 24),
    f("avx512cd", 7, 0, Reg::Ebx, 28),
    f("sha_ni", 7, 0, Reg::Ebx, 29),
    f("avx512bw", 7, 0, Reg::Ebx, 30),
    f("avx512vl", 7, 0, Reg::Ebx, 31),
    f("avx512vbmi", 7, 0, Reg::Ecx, 1),
    f("umip", 7, 0, Reg::Ecx, 2),
    f("pku", 7, 0, Reg::Ecx, 3),
    f("gfni", 7, 0, Reg::Ecx, 8),
    f("vaes", 7, 0, Reg::Ecx, 9),
    f("vpclmulqdq", 7, 0, Reg::Ecx, 10),
    f("avx512_vnni", 7, 0, Reg::Ecx, 11),
    f("rdpid", 7, 0, Reg::Ecx, 22),
    f("fsrm", 7, 0, Reg::Edx, 4),
    f("lahf_lm", 0x8000_0001, 0, Reg::Ecx, 0),
    f("abm", 0x8000_0001, 0, Reg::Ecx, 5),
    f("3dnowprefetch", 0x8000_0001, 0, Reg::Ecx, 8),
    f("pdpe1gb", 0x8000_0001, 0, Reg::Edx, 26),
    f("rdtscp", 0x8000_0001, 0, Reg::Edx, 27),
];

/// A feature name that is not in the table.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
/// unknown CPU feature {0:?} (known: sse3 ... avx2, avx512f, sha_ni, ...; see `livemig host info`)
pub struct UnknownFeature(pub String);

fn find(name: &str) -> Result<&'static Feature, UnknownFeature> {
    FEATURES
        .iter()
        .find(|x| x.name == name)
        .ok_or_else(|| UnknownFeature(name.to_string()))
}

fn reg(l: &Leaf, r: Reg) -> u32 {
    match r {
        Reg::Ebx => l.ebx,
        Reg::Ecx => l.ecx,
        Reg::Edx => l.edx,
    }
}

fn reg_mut(l: &mut Leaf, r: Reg) -> &mut u32 {
    match r {
        Reg::Ebx => &mut l.ebx,
        Reg::Ecx => &mut l.ecx,
        Reg::Edx => &mut l.edx,
    }
}

/// The named features `leaves` offer.
pub fn features(leaves: &[Leaf]) -> BTreeSet<String> {
    FEATURES
        .iter()
        .filter(|x| {
            leaves.iter().any(|l| {
                l.function == x.function && l.index == x.index && reg(l, x.reg) >> x.bit & 1 == 1
            })
        })
        .map(|x| x.name.to_string())
        .collect()
}

/// Clears the features named in `removed` from `leaves`.
pub fn mask(leaves: &mut [Leaf], removed: &[String]) -> Result<(), UnknownFeature> {
    for name in removed {
        let x = find(name)?;
        for l in leaves
            .iter_mut()
            .filter(|l| l.function == x.function && l.index == x.index)
        {
            *reg_mut(l, x.reg) &= !(1u32 << x.bit);
        }
    }
    Ok(())
}

/// `--cpu-features -avx2,-avx512f`: the features to mask, each checked.
pub fn parse_removed(s: &str) -> Result<Vec<String>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| {
            let name = x
                .strip_prefix('-')
                .ok_or_else(|| format!("{x:?}: a feature to mask is written -NAME (e.g. -avx2)"))?;
            find(name).map_err(|e| e.to_string())?;
            Ok(name.to_string())
        })
        .collect()
}

/// What a VM that sees `vm` would miss on a host that offers `host`, in name order.
pub fn missing(vm: &[String], host: &BTreeSet<String>) -> Vec<String> {
    let mut m: Vec<String> = vm.iter().filter(|x| !host.contains(*x)).cloned().collect();
    m.sort();
    m.dedup();
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves() -> Vec<Leaf> {
        vec![
            Leaf {
                function: 1,
                index: 0,
                eax: 0,
                ebx: 0,
                ecx: (1 << 28) | (1 << 20),
                edx: 1 << 26,
            },
            Leaf {
                function: 7,
                index: 0,
                eax: 0,
                ebx: (1 << 5) | (1 << 16),
                ecx: 0,
                edx: 0,
            },
        ]
    }

    #[test]
    fn features_are_read_and_masked_by_name() {
        let mut l = leaves();
        let all = features(&l);
        assert_eq!(
            all.iter().map(String::as_str).collect::<Vec<_>>(),
            ["avx", "avx2", "avx512f", "sse2", "sse4_2"]
        );
        mask(&mut l, &["avx2".into()]).unwrap();
        assert!(!features(&l).contains("avx2"));
        assert!(features(&l).contains("avx512f"));
        assert!(mask(&mut l, &["warp_drive".into()]).is_err());
    }

    #[test]
    fn a_host_missing_a_feature_the_vm_sees_is_named() {
        let host: BTreeSet<String> = ["avx", "sse2"].map(String::from).into();
        let vm = ["avx2".to_string(), "avx".into(), "avx512f".into()];
        assert_eq!(missing(&vm, &host), ["avx2", "avx512f"]);
        assert!(missing(&["avx".into()], &host).is_empty());
    }

    #[test]
    fn masks_are_written_with_a_minus() {
        assert_eq!(
            parse_removed("-avx2, -avx512f").unwrap(),
            ["avx2", "avx512f"]
        );
        assert!(parse_removed("avx2").is_err());
        assert!(parse_removed("-nope").is_err());
        assert!(parse_removed("").unwrap().is_empty());
    }
}
