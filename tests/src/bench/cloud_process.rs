//! The cloud as its own process (`tandem serve`), so that its CPU time and memory are its own and not the edges'.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};

/// A running `tandem serve`, killed on drop.
pub struct CloudProcess {
    child: Child,
    pub addr: SocketAddr,
    /// What it printed before listening (e.g. `context ID …` for each `--context-file`).
    pub banner: Vec<String>,
}

/// Linux's USER_HZ: the unit of /proc's CPU times on every architecture Linux ships today.
const TICKS_PER_S: f64 = 100.0;

impl CloudProcess {
    /// Starts `tandem serve` for `model` on `ip` (an ephemeral port) behind `prefix` (e.g. `ip netns exec NS`).
    /// Every simulated edge connects from the same address: the per-client stream limit must not count them as one.
    pub fn start(model: &str, ip: IpAddr, prefix: &[String]) -> Result<CloudProcess, String> {
        let args = ["--client-streams".to_string(), "100000".to_string()];
        Self::start_at(model, SocketAddr::new(ip, 0), prefix, &args)
    }

    /// Starts `tandem serve` for `model` on `addr` behind `prefix`, with more `serve` arguments.
    pub fn start_at(
        model: &str,
        addr: SocketAddr,
        prefix: &[String],
        args: &[String],
    ) -> Result<CloudProcess, String> {
        let binary = crate::target_dir().join("release/tandem");
        if !binary.exists() {
            return Err(format!(
                "{} is missing: run `cargo build --release -p tandem-cloud`",
                binary.display()
            ));
        }
        let mut argv: Vec<String> = prefix.to_vec();
        argv.push(binary.display().to_string());
        argv.extend(["serve", "--model", model, "--addr", &addr.to_string()].map(String::from));
        // Room for every context and codec of the run in memory: spilling is not what is measured.
        argv.extend(["--store-mib", "8192"].map(String::from));
        argv.extend(args.iter().cloned());
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", argv.join(" ")))?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let mut banner = Vec::new();
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    banner.push(line.clone());
                    if let Some(url) = line.split("listening on http://").nth(1) {
                        break url
                            .trim()
                            .parse::<SocketAddr>()
                            .map_err(|e| format!("bad address {url}: {e}"))?;
                    }
                }
                _ => {
                    let status = child.wait().map_err(|e| e.to_string())?;
                    return Err(format!(
                        "`{}` exited ({status}) before listening",
                        argv.join(" ")
                    ));
                }
            }
        };
        // Keep draining its stdout so it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Ok(CloudProcess {
            child,
            addr,
            banner,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds (user + system) the cloud has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start at `state`; utime and stime are 14th and 15th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<f64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0.0))
            .collect();
        if f.len() < 13 {
            return 0.0;
        }
        (f[11] + f[12]) / TICKS_PER_S
    }

    /// The cloud's peak resident memory, bytes.
    pub fn peak_rss(&self) -> u64 {
        self.status_kb("VmHWM:")
    }

    /// The cloud's resident memory now, bytes.
    pub fn rss(&self) -> u64 {
        self.status_kb("VmRSS:")
    }

    fn status_kb(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }
}

impl Drop for CloudProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
