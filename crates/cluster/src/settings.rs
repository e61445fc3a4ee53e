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
}

impl Setting {
    pub const ALL: [Setting; 5] = [
        Setting::Transport,
        Setting::Channels,
        Setting::MaxBandwidth,
        Setting::MaxConcurrentPerHost,
        Setting::CpuBaseline,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Setting::Transport => "transport",
            Setting::Channels => "channels",
            Setting::MaxBandwidth => "max-bandwidth",
            Setting::MaxConcurrentPerHost => "max-concurrent-per-host",
            Setting::CpuBaseline => "cpu-baseline",
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
        assert!("migration-speed".parse::<Setting>().is_err());
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
