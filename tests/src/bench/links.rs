//! Link profiles and how they are emulated: in the kernel (a network namespace holding the cloud, a veth pair to it,
//! `tc netem` delay + rate + loss on both ends) when running as root on a kernel with netem, else the in-process
//! shaper ([`crate::shaper`]: delay and rate, no loss). The report says which, and why.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use crate::shaper::{Link, shaped_relay};

/// A link an edge may sit behind.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Profile {
    pub name: &'static str,
    pub bits_per_s: f64,
    pub rtt_ms: f64,
    /// Packet loss per direction, percent.
    pub loss_pct: f64,
}

pub const PROFILES: [Profile; 4] = [
    Profile {
        name: "6G",
        bits_per_s: 1e9,
        rtt_ms: 2.0,
        loss_pct: 0.0,
    },
    Profile {
        name: "5G",
        bits_per_s: 100e6,
        rtt_ms: 20.0,
        loss_pct: 0.0,
    },
    Profile {
        name: "4G",
        bits_per_s: 20e6,
        rtt_ms: 50.0,
        loss_pct: 0.0,
    },
    Profile {
        name: "poor",
        bits_per_s: 5e6,
        rtt_ms: 100.0,
        loss_pct: 1.0,
    },
];

impl Profile {
    pub fn by_name(name: &str) -> Option<Profile> {
        PROFILES
            .iter()
            .copied()
            .find(|p| p.name.eq_ignore_ascii_case(name))
    }

    pub fn describe(&self) -> String {
        let rate = if self.bits_per_s >= 1e9 {
            format!("{:.0} Gb/s", self.bits_per_s / 1e9)
        } else {
            format!("{:.0} Mb/s", self.bits_per_s / 1e6)
        };
        let loss = if self.loss_pct > 0.0 {
            format!(", {}% loss", self.loss_pct)
        } else {
            String::new()
        };
        format!("{} ({rate}, {} ms RTT{loss})", self.name, self.rtt_ms)
    }

    /// The least time `bytes` can take on this link after a request: one round trip plus serialisation.
    pub fn wire_time_s(&self, bytes: f64) -> f64 {
        self.rtt_ms / 1e3 + bytes * 8.0 / self.bits_per_s
    }

    fn shaper_link(&self) -> Link {
        Link {
            bits_per_s: self.bits_per_s,
            one_way: Duration::from_secs_f64(self.rtt_ms / 2e3),
        }
    }
}

/// How links are emulated in this run.
pub enum Emulator {
    /// The cloud runs in `ns`; traffic to it crosses a veth pair whose two ends carry netem qdiscs.
    Kernel(Netns),
    /// The cloud listens on 127.0.0.1; edges reach it through a shaping relay, one per profile.
    InProcess { why: String },
}

impl Emulator {
    /// The kernel emulator where it can be set up, else the in-process one (with the reason).
    pub fn pick(force_in_process: bool) -> Emulator {
        if force_in_process {
            return Emulator::InProcess {
                why: "asked for (--in-process-links)".into(),
            };
        }
        match Netns::create() {
            Ok(ns) => Emulator::Kernel(ns),
            Err(why) => Emulator::InProcess { why },
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Emulator::Kernel(ns) => format!(
                "kernel: network namespace {} + veth + tc netem (delay, rate, loss) on both ends",
                ns.name
            ),
            Emulator::InProcess { why } => format!(
                "in-process shaper (TCP relay pacing each direction to the rate after a one-way delay; no packet loss): {why}"
            ),
        }
    }

    pub fn emulates_loss(&self) -> bool {
        matches!(self, Emulator::Kernel(_))
    }

    /// Where the cloud should listen, and the command prefix that puts it in place.
    pub fn cloud_placement(&self) -> (IpAddr, Vec<String>) {
        match self {
            Emulator::Kernel(ns) => (
                IpAddr::V4(ns.cloud_ip),
                vec!["ip".into(), "netns".into(), "exec".into(), ns.name.clone()],
            ),
            Emulator::InProcess { .. } => (IpAddr::V4(Ipv4Addr::LOCALHOST), Vec::new()),
        }
    }

    /// Puts `profile` between edges and the cloud at `cloud`; returns the address edges should dial. All edges share
    /// the kernel's link; each connection gets its own link in-process.
    pub fn shape(&self, cloud: SocketAddr, profile: &Profile) -> Result<SocketAddr, String> {
        match self {
            Emulator::Kernel(ns) => {
                ns.set(Some(profile))?;
                Ok(cloud)
            }
            Emulator::InProcess { .. } => Ok(shaped_relay(cloud, profile.shaper_link())),
        }
    }

    /// A link of its own for every connection (many edges, each on its own `profile` link): the in-process shaper
    /// in both modes, in front of an unshaped kernel path.
    pub fn per_edge(&self, cloud: SocketAddr, profile: &Profile) -> Result<SocketAddr, String> {
        if let Emulator::Kernel(ns) = self {
            ns.set(None)?;
        }
        Ok(shaped_relay(cloud, profile.shaper_link()))
    }
}

/// A network namespace with a veth pair to it, removed on drop.
pub struct Netns {
    pub name: String,
    host_if: String,
    ns_if: String,
    pub cloud_ip: Ipv4Addr,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// Creates the namespace and veth pair and checks that netem works; on any failure, removes what it made.
    fn create() -> Result<Netns, String> {
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map_err(|e| format!("cannot run id: {e}"))?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err("not root: network namespaces and tc need root".into());
        }
        let pid = std::process::id() % 10_000;
        let octet = (pid % 250) as u8;
        let ns = Netns {
            name: format!("tandem-bench-{pid}"),
            host_if: format!("tbh{pid}"),
            ns_if: format!("tbn{pid}"),
            cloud_ip: Ipv4Addr::new(10, 213, octet, 2),
        };
        let host_ip = format!("10.213.{octet}.1/30");
        let cloud_ip = format!("{}/30", ns.cloud_ip);
        let n = ns.name.as_str();
        run(&["ip", "netns", "add", n])?;
        // From here on, dropping `ns` removes the namespace and the veth pair.
        run(&[
            "ip",
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
        ])?;
        run(&["ip", "link", "set", &ns.ns_if, "netns", n])?;
        run(&["ip", "addr", "add", &host_ip, "dev", &ns.host_if])?;
        run(&["ip", "link", "set", &ns.host_if, "up"])?;
        run(&[
            "ip", "netns", "exec", n, "ip", "addr", "add", &cloud_ip, "dev", &ns.ns_if,
        ])?;
        run(&[
            "ip", "netns", "exec", n, "ip", "link", "set", &ns.ns_if, "up",
        ])?;
        run(&["ip", "netns", "exec", n, "ip", "link", "set", "lo", "up"])?;
        ns.set(Some(&PROFILES[0]))
            .map_err(|e| format!("tc netem is unavailable ({e})"))?;
        ns.set(None)?;
        Ok(ns)
    }

    /// Shapes both directions to `profile` (half the RTT each way), or removes the shaping.
    fn set(&self, profile: Option<&Profile>) -> Result<(), String> {
        for (prefix, dev) in [
            (vec![], &self.host_if),
            (vec!["ip", "netns", "exec", self.name.as_str()], &self.ns_if),
        ] {
            let mut cmd: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
            match profile {
                Some(p) => cmd.extend(
                    [
                        "tc",
                        "qdisc",
                        "replace",
                        "dev",
                        dev,
                        "root",
                        "netem",
                        "delay",
                        &format!("{}us", (p.rtt_ms * 500.0) as u64),
                        "rate",
                        &format!("{}bit", p.bits_per_s as u64),
                        "loss",
                        &format!("{}%", p.loss_pct),
                        "limit",
                        "100000",
                    ]
                    .map(String::from),
                ),
                None => {
                    // Deleting a qdisc that is not there fails; that is the state we want.
                    cmd.extend(["tc", "qdisc", "del", "dev", dev, "root"].map(String::from));
                    let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
                    let _ = run(&args);
                    continue;
                }
            }
            let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
            run(&args)?;
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys the veth pair with it.
        let _ = run(&["ip", "link", "del", &self.host_if]);
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}
