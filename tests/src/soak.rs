//! `just soak`: many edges chat against a cloud while the network and the cloud fail under them — connections cut
//! and corrupted mid-stream, jitter, the cloud process killed and restarted — and every answer is checked against
//! the one computed locally. Each request must end with the right answer (from the cloud, resumed, or a local
//! fallback) or a clear error; the report counts which, with latencies and the cloud's memory over time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::{Duration, Instant};

use serde::Serialize;
use tandem_common::codec::Codec;
use tandem_common::engine::GenerateOptions;
use tandem_common::tokenizer::Message;
use tandem_edge::chat::{CloudContext, ContextSource, KvSource, chat_turn};

use crate::bench::cloud_process::CloudProcess;
use crate::bench::results::percentile;
use crate::bench::workload::{Corpus, user_prompt};
use crate::faults;

#[derive(Debug, Clone, Serialize)]
pub struct SoakConfig {
    pub model: String,
    pub requests: usize,
    /// The soak stops here even if fewer requests ran.
    pub max_duration: Duration,
    /// Concurrent edges.
    pub edges: usize,
    /// Share of connections cut or corrupted mid-stream.
    pub fault_rate: f64,
    pub jitter_ms: u64,
    /// Share of relayed chunks that stall one retransmission timeout, as a lost packet does.
    pub loss: f64,
    /// The cloud is killed this often (`None`: never), and stays down this long.
    pub restart_every: Option<Duration>,
    pub down_for: Duration,
    pub context_tokens: usize,
    pub answer_tokens: usize,
    /// How long an edge waits for the cloud (connection, header, each layer) before resuming or falling back.
    pub edge_timeout: Duration,
    pub seed: u64,
}

impl Default for SoakConfig {
    fn default() -> Self {
        SoakConfig {
            model: "smollm2".into(),
            requests: 10_000,
            max_duration: Duration::from_secs(30 * 60),
            edges: 8,
            fault_rate: 0.1,
            jitter_ms: 2,
            loss: 0.005,
            restart_every: Some(Duration::from_secs(30)),
            down_for: Duration::from_secs(2),
            context_tokens: 96,
            answer_tokens: 6,
            edge_timeout: Duration::from_secs(3),
            seed: 7,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SoakReport {
    pub config: SoakConfig,
    pub requests: usize,
    /// Right answers, by where the context's KV came from.
    pub correct_from_cloud: usize,
    pub correct_resumed: usize,
    pub correct_local_fallback: usize,
    /// Answers that differ from the local reference: never acceptable.
    pub wrong: usize,
    /// Requests that ended in an error, by message.
    pub errors: BTreeMap<String, usize>,
    pub latency_p50_s: f64,
    pub latency_p99_s: f64,
    pub latency_max_s: f64,
    pub restarts: usize,
    pub connections: usize,
    pub cuts: usize,
    pub corruptions: usize,
    pub losses: usize,
    /// (seconds since the start, cloud resident bytes), sampled twice a second while the cloud was up.
    pub cloud_memory: Vec<(f64, u64)>,
    pub wall_s: f64,
}

impl SoakReport {
    pub fn correct(&self) -> usize {
        self.correct_from_cloud + self.correct_resumed + self.correct_local_fallback
    }

    pub fn success_rate(&self) -> f64 {
        self.correct() as f64 / self.requests.max(1) as f64
    }

    pub fn summary(&self) -> String {
        let mb = |b: u64| b as f64 / 1e6;
        let (lo, hi) = self
            .cloud_memory
            .iter()
            .fold((u64::MAX, 0), |(lo, hi), &(_, m)| (lo.min(m), hi.max(m)));
        format!(
            "{} requests from {} edges in {:.0} s ({:.1}/s): {} right ({:.3}%): {} from the cloud, {} after resuming a \
             broken stream, {} from a local fallback; {} wrong; {} errors {:?}\n\
             faults: {} of {} connections cut, {} corrupted, jitter ≤ {} ms, {} chunks lost (each {} ms late); cloud killed and restarted {} times; every call \
             with a signed token\n\
             latency p50 {:.3} s, p99 {:.3} s, max {:.3} s; cloud memory {:.0}–{:.0} MB over the run",
            self.requests,
            self.config.edges,
            self.wall_s,
            self.requests as f64 / self.wall_s,
            self.correct(),
            self.success_rate() * 100.0,
            self.correct_from_cloud,
            self.correct_resumed,
            self.correct_local_fallback,
            self.wrong,
            self.errors.values().sum::<usize>(),
            self.errors,
            self.cuts,
            self.connections,
            self.corruptions,
            self.config.jitter_ms,
            self.losses,
            faults::RTO.as_millis(),
            self.restarts,
            self.latency_p50_s,
            self.latency_p99_s,
            self.latency_max_s,
            mb(if lo == u64::MAX { 0 } else { lo }),
            mb(hi),
        )
    }
}

enum Outcome {
    Cloud,
    Resumed,
    Fallback,
    Wrong,
    Error(String),
}

/// Runs the soak; `progress(done)` is called after each request.
pub fn run(cfg: &SoakConfig, progress: &(dyn Fn(usize) + Sync)) -> Result<SoakReport, String> {
    let started = Instant::now();
    let e = crate::engine(&cfg.model);
    let corpus = Corpus::load(e)?;
    let context = corpus.text(e, 4242, cfg.context_tokens);
    let file = crate::target_dir().join(format!("soak-context-{}.txt", std::process::id()));
    std::fs::write(&file, &context).map_err(|e| format!("{}: {e}", file.display()))?;
    // Auth on, as in a deployment: the cloud checks every edge's signed token on every connection.
    let key = crate::tokens::TestKey::new();
    let keys = crate::target_dir().join(format!("soak-keys-{}", std::process::id()));
    std::fs::write(&keys, format!("{}\n", key.line))
        .map_err(|e| format!("{}: {e}", keys.display()))?;
    let token = key.token("edges", 86_400);
    let serve_args = [
        "--context-file".to_string(),
        file.display().to_string(),
        "--auth-keys".to_string(),
        keys.display().to_string(),
    ];

    // The reference answers, computed here once.
    let opts = GenerateOptions {
        max_tokens: cfg.answer_tokens,
        ..Default::default()
    };
    let prompts: Vec<Vec<Message>> = (0..12)
        .map(|i| vec![Message::new("user", &user_prompt(&corpus, e, i, 24))])
        .collect();
    let local = ContextSource {
        cloud: None,
        text: Some(context.clone()),
    };
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .map(|m| chat_turn(e, &local, m, &opts, |_, _| {}).map(|(ids, _)| ids))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;

    let start = |addr| CloudProcess::start_at(&cfg.model, addr, &[], &serve_args);
    let first = start(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let cloud_addr = first.addr;
    let id = first
        .banner
        .iter()
        .find_map(|l| {
            l.strip_prefix("context ")?
                .split_whitespace()
                .next()
                .map(String::from)
        })
        .ok_or("the cloud printed no context id")?;
    let cloud = Mutex::new(Some(first));
    // Faults land anywhere in the stream: a lossless layer of this context is ~70 kB, all of them ~2 MB.
    let (relay, injected) = faults::chaos(
        cloud_addr,
        cfg.fault_rate,
        2 << 20,
        cfg.jitter_ms,
        cfg.loss,
        cfg.seed,
    );

    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let restarts = AtomicUsize::new(0);
    let outcomes = Mutex::new(Vec::with_capacity(cfg.requests));
    let memory = Mutex::new(Vec::new());
    let cloud_ctx = CloudContext {
        cloud_url: format!("http://{relay}"),
        model: cfg.model.clone(),
        context: id,
        codec: Some(Codec::Lossless),
        mode: Default::default(),
        bandwidth_bps: None,
        auth: Some(token),
        timeout: cfg.edge_timeout,
    };
    let restart_failed = Mutex::new(None);
    std::thread::scope(|s| {
        // The cloud's killer.
        if let Some(every) = cfg.restart_every {
            let (cloud, stop, restarts, restart_failed, start) =
                (&cloud, &stop, &restarts, &restart_failed, &start);
            s.spawn(move || {
                while !sleep_unless(stop, every) {
                    drop(cloud.lock().expect("cloud").take());
                    let up_again = !sleep_unless(stop, cfg.down_for);
                    // The port may linger a moment after the kill.
                    let mut tries = 0;
                    let restarted = loop {
                        match start(cloud_addr) {
                            Ok(c) => break Ok(c),
                            Err(_) if tries < 20 => {
                                tries += 1;
                                std::thread::sleep(Duration::from_millis(250));
                            }
                            Err(e) => break Err(e),
                        }
                    };
                    match restarted {
                        Ok(c) => {
                            *cloud.lock().expect("cloud") = Some(c);
                            restarts.fetch_add(1, Relaxed);
                        }
                        Err(e) => {
                            *restart_failed.lock().expect("flag") = Some(e);
                            break;
                        }
                    }
                    if !up_again {
                        break;
                    }
                }
            });
        }
        // The cloud's memory, twice a second.
        s.spawn(|| {
            while !sleep_unless(&stop, Duration::from_millis(500)) {
                if let Some(c) = cloud.lock().expect("cloud").as_ref() {
                    memory
                        .lock()
                        .expect("memory")
                        .push((started.elapsed().as_secs_f64(), c.rss()));
                }
            }
        });
        let edges: Vec<_> = (0..cfg.edges)
            .map(|_| {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Relaxed);
                        if i >= cfg.requests || started.elapsed() > cfg.max_duration {
                            break;
                        }
                        let source = ContextSource {
                            cloud: Some(cloud_ctx.clone()),
                            text: Some(context.clone()),
                        };
                        let t = Instant::now();
                        let outcome = match chat_turn(
                            e,
                            &source,
                            &prompts[i % prompts.len()],
                            &opts,
                            |_, _| {},
                        ) {
                            Ok((ids, _)) if ids != expected[i % prompts.len()] => Outcome::Wrong,
                            Ok((_, st)) => match st.source {
                                KvSource::Cloud { .. } if st.kv.resumes > 0 => Outcome::Resumed,
                                KvSource::Cloud { .. } => Outcome::Cloud,
                                _ => Outcome::Fallback,
                            },
                            Err(e) => Outcome::Error(e.to_string()),
                        };
                        let done = {
                            let mut o = outcomes.lock().expect("outcomes");
                            o.push((outcome, t.elapsed().as_secs_f64()));
                            o.len()
                        };
                        progress(done);
                    }
                })
            })
            .collect();
        for edge in edges {
            let _ = edge.join();
        }
        stop.store(true, Relaxed);
    });
    drop(cloud.lock().expect("cloud").take());
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(&keys);
    if let Some(e) = restart_failed.lock().expect("flag").take() {
        return Err(format!("the cloud could not be restarted: {e}"));
    }

    let outcomes = outcomes.into_inner().expect("outcomes");
    let count = |f: fn(&Outcome) -> bool| outcomes.iter().filter(|(o, _)| f(o)).count();
    let mut errors = BTreeMap::new();
    for (o, _) in &outcomes {
        if let Outcome::Error(m) = o {
            *errors.entry(m.clone()).or_insert(0) += 1;
        }
    }
    let latency = |q| percentile(outcomes.iter().map(|(_, t)| *t), q);
    Ok(SoakReport {
        config: cfg.clone(),
        requests: outcomes.len(),
        correct_from_cloud: count(|o| matches!(o, Outcome::Cloud)),
        correct_resumed: count(|o| matches!(o, Outcome::Resumed)),
        correct_local_fallback: count(|o| matches!(o, Outcome::Fallback)),
        wrong: count(|o| matches!(o, Outcome::Wrong)),
        errors,
        latency_p50_s: latency(0.5),
        latency_p99_s: latency(0.99),
        latency_max_s: latency(1.0),
        restarts: restarts.into_inner(),
        connections: injected.connections.load(Relaxed),
        cuts: injected.cuts.load(Relaxed),
        corruptions: injected.corruptions.load(Relaxed),
        losses: injected.losses.load(Relaxed),
        cloud_memory: memory.into_inner().expect("memory"),
        wall_s: started.elapsed().as_secs_f64(),
    })
}

/// Sleeps `d` in short steps; true if `stop` was set meanwhile.
fn sleep_unless(stop: &AtomicBool, d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if stop.load(Relaxed) {
            return true;
        }
        std::thread::sleep(
            Duration::from_millis(50).min(until.saturating_duration_since(Instant::now())),
        );
    }
    stop.load(Relaxed)
}
