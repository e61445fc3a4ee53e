//! The cluster-wide live-migration settings (as a cluster's operator sets them once, not on
//! every command line): their names, how each value is checked, their defaults, and the
//! effective value of each with where it came from. Pure: the store is elsewhere.
use serde::Serialize;

/// A setting the cluster keeps, and the agents apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Setting {
    /// The transport of migrations out of every host: tcp, compressed or direct.
    Transport,
    /// Page streams beside the control connection.
    Channels,
    /// The cap on each migration's rate, bits/s.
    MaxBandwidth,
    /// Migrations each host takes in at once.
    MaxConcurrentPerHost,
    /// The CPU features new VMs see: `host` (all their host offers) or `cluster` (those every
    /// live host offers, so they may go anywhere).
    CpuBaseline,
    /// The networks migrations go over (IPv4 CIDRs): a drain reaches each host on its
    /// address there, and leaves out hosts without one.
    MigrationNetwork,
}

impl Setting {
    pub const ALL: [Setting; 6] = [
        Setting::Transport,
        Setting::Channels,
        Setting::MaxBandwidth,
        Setting::MaxConcurrentPerHost,
        Setting::CpuBaseline,
        Setting::MigrationNetwork,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Setting::Transport => "transport",
            Setting::Channels => "channels",
            Setting::MaxBandwidth => "max-bandwidth",
            Setting::MaxConcurrentPerHost => "max-concurrent-per-host",
            Setting::CpuBaseline => "cpu-baseline",
            Setting::MigrationNetwork => "migration-network",
        }
    }

    /// What a host uses when the cluster says nothing.
    pub fn default_value(self) -> &'static str {
        match self {
            Setting::Transport => "tcp",
            Setting::Channels => "0",
            Setting::MaxBandwidth => "none",
            Setting::MaxConcurrentPerHost => "the agent's --max-inbound",
            Setting::CpuBaseline => "host",
            Setting::MigrationNetwork => "any (where each host listens)",
        }
    }

    /// `value` in its canonical form, or why it is not one this setting takes.
    pub fn check(self, value: &str) -> Result<String, String> {
        let v = value.trim();
        match self {
            Setting::Transport => match v {
                "tcp" | "compressed" | "direct" => Ok(v.to_string()),
                _ => Err(format!("{v:?}: transport is tcp, compressed or direct")),
            },
            Setting::Channels => match v.parse::<u16>() {
                Ok(n) if n <= 16 => Ok(n.to_string()),
                _ => Err(format!("{v:?}: channels is 0 to 16")),
            },
            Setting::MaxBandwidth => parse_bits(v)
                .map(|b| b.to_string())
                .ok_or_else(|| format!("{v:?}: max-bandwidth is a rate such as 800Mbit or 10Gbit")),
            Setting::MaxConcurrentPerHost => match v.parse::<usize>() {
                Ok(n @ 1..=64) => Ok(n.to_string()),
                _ => Err(format!("{v:?}: max-concurrent-per-host is 1 to 64")),
            },
            Setting::CpuBaseline => match v {
                "host" | "cluster" => Ok(v.to_string()),
                _ => Err(format!("{v:?}: cpu-baseline is host or cluster")),
            },
            Setting::MigrationNetwork => parse_networks(v).map(|nets| {
                nets.iter()
                    .map(|(ip, len)| format!("{ip}/{len}"))
                    .collect::<Vec<_>>()
                    .join(",")
            }),
        }
    }
}

impl std::str::FromStr for Setting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Setting::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Setting::ALL.iter().map(|k| k.name()).collect();
                format!("{s:?} is not a cluster setting ({})", names.join(", "))
            })
    }
}

/// IPv4 networks, `10.0.0.0/24,10.1.0.0/16` (at most 16; host bits must be zero).
pub fn parse_networks(v: &str) -> Result<Vec<(std::net::Ipv4Addr, u8)>, String> {
    let nets: Vec<&str> = v
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    if nets.is_empty() || nets.len() > 16 {
        return Err(format!(
            "{v:?}: migration-network is 1 to 16 IPv4 CIDRs (10.0.0.0/24,...)"
        ));
    }
    nets.into_iter()
        .map(|n| {
            let bad = || format!("{n:?} is not an IPv4 CIDR such as 10.0.0.0/24");
            let (ip, len) = n.split_once('/').ok_or_else(bad)?;
            let ip: std::net::Ipv4Addr = ip.parse().map_err(|_| bad())?;
            let len: u8 = len.parse().ok().filter(|l| *l <= 32).ok_or_else(bad)?;
            if u32::from(ip) & !mask(len) != 0 {
                return Err(format!("{n}: its host bits are not zero"));
            }
            Ok((ip, len))
        })
        .collect()
}

fn mask(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

/// Whether `ip` lies in one of `nets`.
pub fn in_networks(ip: std::net::Ipv4Addr, nets: &[(std::net::Ipv4Addr, u8)]) -> bool {
    nets.iter()
        .any(|(net, len)| u32::from(ip) & mask(*len) == u32::from(*net))
}

/// A rate: digits, then bit, Kbit, Mbit or Gbit (the unit decides; a bare number is bits/s).
pub fn parse_bits(v: &str) -> Option<u64> {
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (n, unit) = v.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "bit" => 1,
        "kbit" => 1_000,
        "mbit" => 1_000_000,
        "gbit" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult).filter(|b| *b > 0)
}

/// The settings as the cluster holds them (name, value), checked; what does not check is
/// kept out, and said.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Settings {
    pub transport: Option<String>,
    pub channels: Option<u16>,
    pub max_bandwidth: Option<u64>,
    pub max_concurrent_per_host: Option<usize>,
    pub cpu_baseline: Option<String>,
    /// Canonical CIDRs, comma-separated.
    pub migration_network: Option<String>,
    /// Values in the store that do not check (written around this tool), and why.
    pub refused: Vec<(String, String)>,
}

impl Settings {
    /// From the store's (name, value) pairs.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut s = Settings::default();
        for (name, value) in pairs {
            let checked = name
                .parse::<Setting>()
                .and_then(|k| k.check(value).map(|v| (k, v)));
            match checked {
                Ok((Setting::Transport, v)) => s.transport = Some(v),
                Ok((Setting::Channels, v)) => s.channels = v.parse().ok(),
                Ok((Setting::MaxBandwidth, v)) => s.max_bandwidth = v.parse().ok(),
                Ok((Setting::MaxConcurrentPerHost, v)) => {
                    s.max_concurrent_per_host = v.parse().ok()
                }
                Ok((Setting::CpuBaseline, v)) => s.cpu_baseline = Some(v),
                Ok((Setting::MigrationNetwork, v)) => s.migration_network = Some(v),
                Err(why) => s.refused.push((name.to_string(), why)),
            }
        }
        s
    }

    /// Each setting's value and where it came from: `cluster`, or `default`.
    pub fn effective(&self) -> Vec<Effective> {
        Setting::ALL
            .into_iter()
            .map(|k| {
                let set = match k {
                    Setting::Transport => self.transport.clone(),
                    Setting::Channels => self.channels.map(|n| n.to_string()),
                    Setting::MaxBandwidth => self.max_bandwidth.map(|b| b.to_string()),
                    Setting::MaxConcurrentPerHost => {
                        self.max_concurrent_per_host.map(|n| n.to_string())
                    }
                    Setting::CpuBaseline => self.cpu_baseline.clone(),
                    Setting::MigrationNetwork => self.migration_network.clone(),
                };
                Effective {
                    setting: k.name(),
                    source: if set.is_some() { "cluster" } else { "default" },
                    value: set.unwrap_or_else(|| k.default_value().to_string()),
                }
            })
            .collect()
    }
}

/// One setting as it applies, and where its value came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Effective {
    pub setting: &'static str,
    pub value: String,
    pub source: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_checked_and_made_canonical() {
        assert_eq!(
            Setting::Transport.check("compressed").unwrap(),
            "compressed"
        );
        assert!(Setting::Transport.check("rdma").is_err());
        assert_eq!(Setting::MaxBandwidth.check("800Mbit").unwrap(), "800000000");
        assert!(Setting::MaxBandwidth.check("0").is_err());
        assert!(Setting::MaxBandwidth.check("99999999999999Gbit").is_err());
        assert!(Setting::Channels.check("17").is_err());
        assert!(Setting::MaxConcurrentPerHost.check("0").is_err());
        assert_eq!(Setting::CpuBaseline.check("cluster").unwrap(), "cluster");
        assert!(Setting::CpuBaseline.check("haswell").is_err());
        assert_eq!(
            Setting::MigrationNetwork
                .check(" 10.1.0.0/16 ,192.168.7.0/24")
                .unwrap(),
            "10.1.0.0/16,192.168.7.0/24"
        );
        assert!(Setting::MigrationNetwork.check("10.1.0.1/16").is_err());
        assert!(Setting::MigrationNetwork.check("10.1.0.0/33").is_err());
        assert!(Setting::MigrationNetwork.check("fe80::/64").is_err());
        assert!("migration-speed".parse::<Setting>().is_err());
    }

    #[test]
    fn an_address_is_in_a_network_by_its_prefix() {
        let nets = parse_networks("10.1.0.0/16,192.168.7.0/24,0.0.0.0/0").unwrap();
        assert!(in_networks("10.1.200.3".parse().unwrap(), &nets[..1]));
        assert!(!in_networks("10.2.0.3".parse().unwrap(), &nets[..2]));
        assert!(in_networks("192.168.7.255".parse().unwrap(), &nets[..2]));
        assert!(in_networks("8.8.8.8".parse().unwrap(), &nets));
    }

    #[test]
    fn the_effective_values_say_where_they_came_from() {
        let s = Settings::from_pairs([
            ("transport", "direct"),
            ("max-bandwidth", "1000000000"),
            ("channels", "lots"),
        ]);
        assert_eq!(s.transport.as_deref(), Some("direct"));
        assert_eq!(s.max_bandwidth, Some(1_000_000_000));
        assert_eq!(s.channels, None);
        assert_eq!(s.refused.len(), 1);
        let e = s.effective();
        assert_eq!(e[0].source, "cluster");
        assert_eq!(e[1].source, "default");
        assert_eq!(e[1].value, "0");
    }
}
