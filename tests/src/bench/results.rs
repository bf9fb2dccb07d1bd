//! What a run measured, as one serialisable value, and the statistics the report draws from it.

use serde::{Deserialize, Serialize};

use super::links::{PROFILES, Profile};
use super::systems::{EdgeRates, Sample, System};

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub command: String,
    pub quick: bool,
    pub machine: Machine,
    pub model: String,
    pub weights_bytes: u64,
    pub link_emulation: String,
    pub loss_emulated: bool,
    /// Always [`PROFILES`] (read back from them, not from the JSON).
    #[serde(skip_deserializing, default = "all_profiles")]
    pub profiles: Vec<Profile>,
    pub context_lengths: Vec<usize>,
    /// One user at a time: every system on every link and context length.
    pub single: Vec<Sample>,
    /// Context KV on the wire per codec and context length.
    pub codecs: Vec<CodecSize>,
    pub concurrency_link: String,
    pub concurrency_context: usize,
    pub edge_rates: Option<EdgeRates>,
    pub concurrency: Vec<ConcurrencyRun>,
    pub cloud_peak_rss_bytes: u64,
    pub cloud_prefill_s: Vec<(usize, f64)>,
    /// What was not run, and why.
    pub notes: Vec<String>,
    pub wall_s: f64,
}

fn all_profiles() -> Vec<Profile> {
    PROFILES.to_vec()
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    /// Measured: all cores summing a 1 GiB buffer, best of three.
    pub memory_bandwidth_bytes_per_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CodecSize {
    pub codec: String,
    pub context_tokens: usize,
    pub bytes: u64,
    pub fp16_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ConcurrencyRun {
    pub system: System,
    pub users: usize,
    pub makespan_s: f64,
    pub cloud_cpu_s: f64,
    pub samples: Vec<Sample>,
}

impl ConcurrencyRun {
    pub fn succeeded(&self) -> usize {
        self.samples.iter().filter(|s| s.ok()).count()
    }

    /// Completed requests per second of wall time.
    pub fn rps(&self) -> f64 {
        self.succeeded() as f64 / self.makespan_s.max(1e-9)
    }

    pub fn e2e(&self, q: f64) -> f64 {
        percentile(self.samples.iter().filter(|s| s.ok()).map(|s| s.e2e_s), q)
    }

    pub fn ttft(&self, q: f64) -> f64 {
        percentile(self.samples.iter().filter(|s| s.ok()).map(|s| s.ttft_s), q)
    }
}

/// The `q` quantile (0..=1) by nearest rank; NaN for no values.
pub fn percentile(values: impl Iterator<Item = f64>, q: f64) -> f64 {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

impl Results {
    /// Successful single-user samples of one cell.
    pub fn cell(&self, system: System, link: &str, context: usize) -> Vec<&Sample> {
        self.single
            .iter()
            .filter(|s| s.system == system && s.context_tokens == context && s.ok())
            .filter(|s| system == System::EdgeOnly || s.link == link)
            .collect()
    }

    /// The median of `f` over a cell.
    pub fn median(
        &self,
        system: System,
        link: &str,
        context: usize,
        f: impl Fn(&Sample) -> f64,
    ) -> f64 {
        percentile(self.cell(system, link, context).into_iter().map(f), 0.5)
    }

    /// Requests that ended well, and all requests, over the whole run.
    pub fn success(&self) -> (usize, usize) {
        let all = self
            .single
            .iter()
            .chain(self.concurrency.iter().flat_map(|r| &r.samples));
        all.fold((0, 0), |(ok, n), s| (ok + s.ok() as usize, n + 1))
    }

    pub fn fallbacks(&self) -> usize {
        let all = self
            .single
            .iter()
            .chain(self.concurrency.iter().flat_map(|r| &r.samples));
        all.filter(|s| s.fallback.is_some()).count()
    }

    /// The run of `system` with `users`.
    pub fn run(&self, system: System, users: usize) -> Option<&ConcurrencyRun> {
        self.concurrency
            .iter()
            .find(|r| r.system == system && r.users == users)
    }
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v = || (1..=100).map(f64::from);
        assert_eq!(percentile(v(), 0.5), 50.0);
        assert_eq!(percentile(v(), 0.99), 99.0);
        assert_eq!(percentile(v(), 1.0), 100.0);
        assert_eq!(percentile([3.0, 1.0, 2.0].into_iter(), 0.0), 1.0);
        assert!(percentile(std::iter::empty(), 0.5).is_nan());
    }
}
