//! `livemig testbed up|down|status`: two hosts as network namespaces with the reference NIC
//! layout: a management link (unshaped), two 1 GbE and two 10 GbE links, each a veth pair
//! shaped with tc tbf on both ends (pfifo_fast's priority bands behind it, as a host queues);
//! and the VM network: an L2 segment on 10.77.9.0/24, a
//! bridge on each host (`vmbr0`, for the taps of its VMs) joined over a link of their own,
//! with a third namespace, the client, on it at 10.77.9.1. Idempotent; `down` removes
//! everything `up` made.
use std::process::Command;

use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("the testbed needs root (network namespaces, veth, tc); run as root")]
    NotRoot,
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("running `{cmd}`: {source} (is iproute2 installed?)")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("--scale must be in (0, 1], not {0}")]
    Scale(f64),
}

/// One link between the two hosts.
#[derive(Clone, Debug, Serialize)]
pub struct Link {
    pub name: &'static str,
    pub dev_a: String,
    pub dev_b: String,
    pub addr_a: String,
    pub addr_b: String,
    /// Nominal rate in bits/s; None = unshaped.
    pub nominal_bps: Option<u64>,
    /// The rate tc enforces (nominal × scale).
    pub shaped_bps: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Testbed {
    pub host_a: String,
    pub host_b: String,
    pub scale: f64,
    pub links: Vec<Link>,
    pub vm_network: VmNetwork,
}

/// The VM network: what a VM's tap joins on each host, and where the client sits.
#[derive(Clone, Debug, Serialize)]
pub struct VmNetwork {
    /// The bridge on each host (`--bridge` for its agent, receivers and VMs).
    pub bridge: String,
    pub subnet: String,
    /// The namespace of the client, and its address.
    pub client: String,
    pub client_addr: String,
    /// The link joining the hosts' bridges, and the client's to host A's.
    pub link_a: String,
    pub link_b: String,
    pub client_dev: String,
    pub client_peer: String,
}

/// The bridge each testbed host puts its VMs' taps on.
pub const VM_BRIDGE: &str = "vmbr0";
/// The VM network's client address, and the addresses VMs may take on it.
pub const VM_CLIENT_ADDR: &str = "10.77.9.1";

/// The address of the `i`th VM on the VM network (`i` from 0).
pub fn vm_addr(i: u8) -> String {
    format!("10.77.9.{}", 10 + u16::from(i))
}

#[derive(Clone, Debug, Serialize)]
pub struct LinkStatus {
    #[serde(flatten)]
    pub link: Link,
    pub up: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub host_a: String,
    pub host_b: String,
    pub present: bool,
    pub links: Vec<LinkStatus>,
    pub vm_network: VmNetwork,
    /// Both bridges, their link and the client's are up.
    pub vm_network_up: bool,
}

const LAYOUT: [(&str, Option<u64>); 5] = [
    ("mgmt", None),
    ("1g-1", Some(1_000_000_000)),
    ("1g-2", Some(1_000_000_000)),
    ("10g-1", Some(10_000_000_000)),
    ("10g-2", Some(10_000_000_000)),
];

impl Testbed {
    /// The layout for hosts `<prefix>-a` and `<prefix>-b`: link i uses 10.77.i.1 (A) and
    /// 10.77.i.2 (B).
    pub fn new(prefix: &str, scale: f64) -> Result<Self, TestbedError> {
        if !(scale > 0.0 && scale <= 1.0) {
            return Err(TestbedError::Scale(scale));
        }
        let links = LAYOUT
            .iter()
            .enumerate()
            .map(|(i, (name, rate))| Link {
                name,
                dev_a: format!("{prefix}-{name}-a"),
                dev_b: format!("{prefix}-{name}-b"),
                addr_a: format!("10.77.{i}.1"),
                addr_b: format!("10.77.{i}.2"),
                nominal_bps: *rate,
                shaped_bps: rate.map(|r| ((r as f64) * scale) as u64),
            })
            .collect();
        Ok(Testbed {
            host_a: format!("{prefix}-a"),
            host_b: format!("{prefix}-b"),
            scale,
            links,
            vm_network: VmNetwork {
                bridge: VM_BRIDGE.into(),
                subnet: "10.77.9.0/24".into(),
                client: format!("{prefix}-client"),
                client_addr: VM_CLIENT_ADDR.into(),
                link_a: format!("{prefix}-vm-a"),
                link_b: format!("{prefix}-vm-b"),
                client_dev: format!("{prefix}-cl"),
                client_peer: format!("{prefix}-cl-a"),
            },
        })
    }

    /// The VM network: a bridge on each host joined by a link, the client on host A's.
    fn vm_network_up(&self) -> Result<(), TestbedError> {
        let v = &self.vm_network;
        if !netns_exists(&v.client)? {
            run("ip", &["netns", "add", &v.client])?;
        }
        run("ip", &["-n", &v.client, "link", "set", "lo", "up"])?;
        for ns in [&self.host_a, &self.host_b] {
            if !link_exists(ns, &v.bridge) {
                run(
                    "ip",
                    &["-n", ns, "link", "add", &v.bridge, "type", "bridge"],
                )?;
            }
            run("ip", &["-n", ns, "link", "set", &v.bridge, "up"])?;
        }
        let pairs = [
            (&self.host_a, &v.link_a, &self.host_b, &v.link_b),
            (&v.client, &v.client_dev, &self.host_a, &v.client_peer),
        ];
        for (ns1, dev1, ns2, dev2) in pairs {
            if !link_exists(ns1, dev1) {
                let _ = run("ip", &["-n", ns2, "link", "del", dev2]);
                run(
                    "ip",
                    &[
                        "-n", ns1, "link", "add", dev1, "type", "veth", "peer", "name", dev2,
                        "netns", ns2,
                    ],
                )?;
            }
        }
        for (ns, dev) in [
            (&self.host_a, &v.link_a),
            (&self.host_b, &v.link_b),
            (&self.host_a, &v.client_peer),
        ] {
            run("ip", &["-n", ns, "link", "set", dev, "master", &v.bridge])?;
            run("ip", &["-n", ns, "link", "set", dev, "up"])?;
        }
        run(
            "ip",
            &[
                "-n",
                &v.client,
                "addr",
                "replace",
                &format!("{}/24", v.client_addr),
                "dev",
                &v.client_dev,
            ],
        )?;
        run("ip", &["-n", &v.client, "link", "set", &v.client_dev, "up"])?;
        Ok(())
    }

    pub fn up(&self) -> Result<(), TestbedError> {
        require_root()?;
        for ns in [&self.host_a, &self.host_b] {
            if !netns_exists(ns)? {
                run("ip", &["netns", "add", ns])?;
            }
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        for l in &self.links {
            if !link_exists(&self.host_a, &l.dev_a) {
                // A half-made pair from an interrupted run would block the add.
                let _ = run("ip", &["-n", &self.host_b, "link", "del", &l.dev_b]);
                run(
                    "ip",
                    &[
                        "-n",
                        &self.host_a,
                        "link",
                        "add",
                        &l.dev_a,
                        "type",
                        "veth",
                        "peer",
                        "name",
                        &l.dev_b,
                        "netns",
                        &self.host_b,
                    ],
                )?;
            }
            for (ns, dev, addr) in [
                (&self.host_a, &l.dev_a, &l.addr_a),
                (&self.host_b, &l.dev_b, &l.addr_b),
            ] {
                run(
                    "ip",
                    &[
                        "-n",
                        ns,
                        "addr",
                        "replace",
                        &format!("{addr}/24"),
                        "dev",
                        dev,
                    ],
                )?;
                run("ip", &["-n", ns, "link", "set", dev, "up"])?;
                match l.shaped_bps {
                    Some(bps) => {
                        // Burst: at least one timer tick's worth at this rate, or tbf caps low.
                        let burst = (bps / 8 / 100).max(64 * 1024);
                        let (rate, burst) = (format!("{bps}bit"), burst.to_string());
                        qdisc(
                            ns,
                            dev,
                            &[
                                "root", "handle", "1:", "tbf", "rate", &rate, "burst", &burst,
                                "latency", "50ms",
                            ],
                        )?;
                        // Behind the shaper, a host's queue: Linux's classic default, whose
                        // bands send what a socket marks interactive first.
                        qdisc(ns, dev, &["parent", "1:1", "pfifo_fast"])?;
                    }
                    None => {
                        let _ = run("tc", &["-n", ns, "qdisc", "del", "dev", dev, "root"]);
                    }
                }
            }
        }
        self.vm_network_up()
    }

    /// Removes both namespaces (and with them every veth and qdisc in them).
    pub fn down(&self) -> Result<(), TestbedError> {
        require_root()?;
        for ns in [&self.host_a, &self.host_b, &self.vm_network.client] {
            if netns_exists(ns)? {
                run("ip", &["netns", "del", ns])?;
            }
        }
        Ok(())
    }

    pub fn status(&self) -> Result<Status, TestbedError> {
        let present = netns_exists(&self.host_a)? && netns_exists(&self.host_b)?;
        let links = self
            .links
            .iter()
            .map(|l| LinkStatus {
                link: l.clone(),
                up: present && link_up(&self.host_a, &l.dev_a) && link_up(&self.host_b, &l.dev_b),
            })
            .collect();
        let v = &self.vm_network;
        let vm_network_up = present
            && netns_exists(&v.client)?
            && link_up(&self.host_a, &v.bridge)
            && link_up(&self.host_b, &v.bridge)
            && link_up(&self.host_a, &v.link_a)
            && link_up(&self.host_b, &v.link_b)
            && link_up(&v.client, &v.client_dev);
        Ok(Status {
            host_a: self.host_a.clone(),
            host_b: self.host_b.clone(),
            present,
            links,
            vm_network: v.clone(),
            vm_network_up,
        })
    }
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and no memory effects.
    unsafe { libc::geteuid() == 0 }
}

fn require_root() -> Result<(), TestbedError> {
    if !is_root() {
        return Err(TestbedError::NotRoot);
    }
    Ok(())
}

/// `tc qdisc replace` on `dev` in namespace `ns`, with `spec` after the device.
fn qdisc(ns: &str, dev: &str, spec: &[&str]) -> Result<(), TestbedError> {
    let mut args = vec!["-n", ns, "qdisc", "replace", "dev", dev];
    args.extend_from_slice(spec);
    run("tc", &args).map(drop)
}

fn run(cmd: &str, args: &[&str]) -> Result<String, TestbedError> {
    let line = format!("{cmd} {}", args.join(" "));
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|source| TestbedError::Spawn {
            cmd: line.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(TestbedError::Command {
            cmd: line,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn netns_exists(ns: &str) -> Result<bool, TestbedError> {
    Ok(run("ip", &["netns", "list"])?
        .lines()
        .any(|l| l.split_whitespace().next() == Some(ns)))
}

fn link_exists(ns: &str, dev: &str) -> bool {
    run("ip", &["-n", ns, "link", "show", dev]).is_ok()
}

fn link_up(ns: &str, dev: &str) -> bool {
    run("ip", &["-n", ns, "-o", "link", "show", dev])
        .is_ok_and(|s| s.contains(",UP") || s.contains("<UP"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_has_the_reference_links_and_scales_them() {
        let t = Testbed::new("x", 0.1).unwrap();
        let names: Vec<&str> = t.links.iter().map(|l| l.name).collect();
        assert_eq!(names, ["mgmt", "1g-1", "1g-2", "10g-1", "10g-2"]);
        assert_eq!(t.links[0].shaped_bps, None, "management is unshaped");
        assert_eq!(t.links[1].shaped_bps, Some(100_000_000));
        assert_eq!(t.links[4].shaped_bps, Some(1_000_000_000));
        assert_eq!(
            (t.links[3].addr_a.as_str(), t.links[3].addr_b.as_str()),
            ("10.77.3.1", "10.77.3.2")
        );
        assert!(
            t.links.iter().all(|l| l.dev_a.len() <= 15),
            "interface names fit IFNAMSIZ"
        );
        let t = Testbed::new("lmtb123", 1.0).unwrap();
        let v = &t.vm_network;
        assert!([&v.link_a, &v.link_b, &v.client_dev, &v.client_peer]
            .iter()
            .all(|d| d.len() <= 15));
        assert_eq!(v.client, "lmtb123-client");
        assert_eq!(vm_addr(0), "10.77.9.10");
        assert!(Testbed::new("x", 0.0).is_err());
        assert!(Testbed::new("x", 2.0).is_err());
    }
}
