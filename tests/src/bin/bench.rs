//! `just bench`: tandem against the systems a user would otherwise pick — edge-only and cloud-only — and against
//! itself without pipelining or compression, under emulated 6G/5G/4G/poor links, with one user and with many,
//! measured side by side in one run. Writes `BENCHMARKS.md`, `bench/results.json` and `bench/*.png` under `--out`.

use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use tandem_cloud::server::ContextInfo;
use tandem_common::codec::Codec;
use tandem_common::engine::Engine;
use tandem_edge::fetch;
use tandem_tests::bench::cloud_process::CloudProcess;
use tandem_tests::bench::links::{Emulator, PROFILES, Profile};
use tandem_tests::bench::results::{CodecSize, ConcurrencyRun, Results};
use tandem_tests::bench::systems::{EdgeRates, Request, Sample, System, replayed_tandem, run};
use tandem_tests::bench::workload::{Corpus, user_prompt};
use tandem_tests::bench::{machine, plots, report};
use tandem_tests::rng::Rng;
use tandem_tests::{engine, http};

#[derive(Parser)]
#[command(about = "tandem vs edge-only and cloud-only under emulated links, one user and many")]
struct Args {
    /// A two-minute version: SmolLM2, a 512-token context, up to 16 users.
    #[arg(long)]
    quick: bool,
    /// The model on the edges and in the cloud (default: qwen-0.5b, or smollm2 with --quick).
    #[arg(long)]
    model: Option<String>,
    /// Where BENCHMARKS.md and bench/ go (default: the repository, or target/bench-quick with --quick).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Shared-context lengths, tokens.
    #[arg(long, value_delimiter = ',')]
    contexts: Option<Vec<usize>>,
    /// Concurrent edges to try.
    #[arg(long, value_delimiter = ',')]
    users: Option<Vec<usize>>,
    /// Runs per single-user cell.
    #[arg(long)]
    reps: Option<usize>,
    /// Use the in-process shaper even where network namespaces and netem work.
    #[arg(long)]
    in_process_links: bool,
    /// Measure nothing: write the report and plots again from a run's results.json.
    #[arg(long)]
    from_json: Option<PathBuf>,
}

/// A registered shared context: its nominal length, id, text, and bytes on the wire per codec.
struct Ctx {
    n: usize,
    id: String,
    text: String,
    sizes: Vec<(Codec, usize)>,
}

/// A single-user cell whose context KV would take longer than this on the wire is not run (the table says so).
const WIRE_CAP_S: f64 = 60.0;

struct Plan {
    model: String,
    out: PathBuf,
    contexts: Vec<usize>,
    users: Vec<usize>,
    reps: usize,
    /// Single-user answer length; concurrent users' prompts and answers are drawn from these ranges.
    answer: usize,
    prompt_range: (usize, usize),
    answer_range: (usize, usize),
    concurrency_context: usize,
}

fn plan(a: &Args) -> Plan {
    let quick = a.quick;
    let contexts = a.contexts.clone().unwrap_or(if quick {
        vec![512]
    } else {
        vec![512, 2048, 8192]
    });
    Plan {
        model: a
            .model
            .clone()
            .unwrap_or_else(|| (if quick { "smollm2" } else { "qwen-0.5b" }).into()),
        out: a.out.clone().unwrap_or_else(|| {
            if quick {
                tandem_tests::target_dir().join("bench-quick")
            } else {
                tandem_tests::repo_root()
            }
        }),
        users: a.users.clone().unwrap_or(if quick {
            vec![1, 4, 16]
        } else {
            vec![1, 4, 16, 64]
        }),
        reps: a.reps.unwrap_or(if quick { 1 } else { 2 }),
        answer: if quick { 32 } else { 64 },
        prompt_range: (16, 128),
        answer_range: if quick { (16, 64) } else { (64, 256) },
        concurrency_context: *contexts
            .iter()
            .min_by_key(|&&c| c.abs_diff(2048))
            .expect("a context length"),
        contexts,
    }
}

fn main() {
    let args = Args::parse();
    if let Err(e) = bench(&args) {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
}

fn bench(args: &Args) -> Result<(), String> {
    let started = Instant::now();
    let p = plan(args);
    if let Some(json) = &args.from_json {
        let text = std::fs::read_to_string(json).map_err(|e| format!("{}: {e}", json.display()))?;
        let results: Results =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", json.display()))?;
        return write(&results, &p.out);
    }
    let command = format!(
        "just bench{}",
        std::env::args()
            .skip(1)
            .map(|a| format!(" {a}"))
            .collect::<String>()
    );
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    // Printed whether or not the bar is drawn (a log keeps them).
    let say = |m: String| pb.suspend(|| println!("{m}"));

    pb.set_message("measuring memory bandwidth");
    let machine = machine::describe();
    say(format!(
        "{} cores ({}), memory bandwidth {:.1} GB/s",
        machine.cores,
        machine.cpu,
        machine.memory_bandwidth_bytes_per_s / 1e9
    ));
    pb.set_message(format!("loading {}", p.model));
    let path = tandem_common::models::resolve(&p.model).map_err(|e| e.to_string())?;
    let weights_bytes = std::fs::metadata(&path).map_err(|e| e.to_string())?.len();
    let e = engine(&p.model);
    let corpus = Corpus::load(e)?;

    let emulator = Emulator::pick(args.in_process_links);
    say(format!("links: {}", emulator.describe()));
    let (ip, prefix) = emulator.cloud_placement();
    let cloud = CloudProcess::start(&p.model, ip, &prefix)?;
    say(format!("cloud: tandem serve on {}", cloud.addr));

    // Contexts: registered (prefilled once in the cloud), every codec encoded once and its size read.
    let wrap = e
        .tokenizer
        .context_tokens("")
        .map_err(|e| e.to_string())?
        .len();
    let mut contexts = Vec::new();
    let mut codecs = Vec::new();
    let mut cloud_prefill_s = Vec::new();
    let c = e.model.config();
    for (i, &n) in p.contexts.iter().enumerate() {
        pb.set_message(format!("the cloud prefills a {n}-token context"));
        let text = corpus.text(e, i * 10_007, n - wrap);
        let t = Instant::now();
        let body = serde_json::json!({ "model": p.model, "text": text }).to_string();
        let (status, reply) = http::request(cloud.addr, "POST", "/v1/contexts", &body);
        if status != 200 && status != 201 {
            return Err(format!("registering a {n}-token context: {status} {reply}"));
        }
        cloud_prefill_s.push((n, t.elapsed().as_secs_f64()));
        let id = serde_json::from_str::<ContextInfo>(&reply)
            .map_err(|e| e.to_string())?
            .id;
        let (_, reply) = http::request(cloud.addr, "GET", &format!("/v1/contexts/{id}"), "");
        let info: ContextInfo =
            serde_json::from_str(&reply).map_err(|e| format!("{e}: {reply}"))?;
        let fp16 = (info.tokens * c.n_layers * 2 * c.n_kv_heads * c.head_dim * 2) as u64;
        for (codec, bytes) in &info.sizes {
            codecs.push(CodecSize {
                codec: codec.to_string(),
                context_tokens: n,
                bytes: *bytes as u64,
                fp16_bytes: fp16,
            });
        }
        contexts.push(Ctx {
            n,
            id,
            text,
            sizes: info.sizes,
        });
    }

    // One user at a time.
    let cloud_systems = [
        System::CloudOnly,
        System::TandemSequential,
        System::TandemLossless,
        System::TandemFull,
    ];
    pb.set_length(
        (p.contexts.len() * p.reps * (1 + PROFILES.len() * cloud_systems.len())) as u64
            + p.users.len() as u64 * 2,
    );
    let mut single = Vec::new();
    let mut notes = Vec::new();
    let mut user = 0usize;
    let contexts = &contexts;
    let request = |user: usize,
                   link: &'static str,
                   addr,
                   bits: f64,
                   ci: usize,
                   prompt: usize,
                   answer: usize| {
        let ctx = &contexts[ci];
        Request {
            engine: e,
            model: &p.model,
            link,
            cloud: addr,
            bits_per_s: bits,
            context_id: &ctx.id,
            context_text: &ctx.text,
            context_tokens: ctx.n,
            user: user_prompt(&corpus, e, user, prompt),
            answer_tokens: answer,
        }
    };
    let measure = |system: System, r: &Request| -> Sample {
        let cpu = cloud.cpu_seconds();
        let mut s = run(system, r);
        s.cloud_cpu_s = cloud.cpu_seconds() - cpu;
        if let Some(err) = &s.error {
            pb.suspend(|| println!("  {} failed: {err}", system.label()));
        }
        s
    };
    for (ci, ctx) in contexts.iter().enumerate() {
        for _ in 0..p.reps {
            pb.set_message(format!("edge-only, {}-token context", ctx.n));
            user += 1;
            let r = request(user, "none", cloud.addr, 0.0, ci, 32, p.answer);
            single.push(measure(System::EdgeOnly, &r));
            pb.inc(1);
        }
    }
    for profile in &PROFILES {
        let addr = emulator
            .shape(cloud.addr, profile)
            .map_err(|e| format!("cannot set up the {} link: {e}", profile.name))?;
        for (ci, ctx) in contexts.iter().enumerate() {
            for system in cloud_systems {
                if system == System::TandemLossless {
                    let bytes = ctx
                        .sizes
                        .iter()
                        .find(|(c, _)| *c == Codec::Lossless)
                        .map_or(0, |x| x.1);
                    let floor = profile.wire_time_s(bytes as f64);
                    if floor > WIRE_CAP_S {
                        notes.push(format!(
                            "{} on {} with a {}-token context was not run: its {:.0} MB take at least {floor:.0} s on that link.",
                            system.label(), profile.name, ctx.n, bytes as f64 / 1e6
                        ));
                        pb.inc(p.reps as u64);
                        continue;
                    }
                }
                for _ in 0..p.reps {
                    pb.set_message(format!(
                        "{}, {}, {}-token context",
                        system.label(),
                        profile.name,
                        ctx.n
                    ));
                    user += 1;
                    let r = request(
                        user,
                        profile.name,
                        addr,
                        profile.bits_per_s,
                        ci,
                        32,
                        p.answer,
                    );
                    single.push(measure(system, &r));
                    pb.inc(1);
                }
            }
        }
        let cell = |s: System| {
            single
                .iter()
                .filter(|x| x.system == s && x.link == profile.name && x.ok())
                .map(|x| x.ttft_s)
                .fold(f64::NAN, f64::min)
        };
        say(format!(
            "{}: best TTFT cloud-only {:.3} s, tandem full {:.3} s",
            profile.describe(),
            cell(System::CloudOnly),
            cell(System::TandemFull)
        ));
    }

    // Many users, each on its own link of the concurrency profile.
    let link = Profile::by_name("5G").expect("5G profile");
    let ci = contexts
        .iter()
        .position(|c| c.n == p.concurrency_context)
        .expect("the context");
    pb.set_message("measuring one edge's compute rates");
    let rates = edge_rates(e, &cloud, &p.model, &contexts[ci].id)?;
    let mut concurrency = Vec::new();
    for &n in &p.users {
        for system in [System::CloudOnly, System::TandemFull] {
            pb.set_message(format!("{n} concurrent edges, {}", system.label()));
            let addr = emulator.per_edge(cloud.addr, &link)?;
            let mut lengths = Rng::new(0x7a6d + n as u64);
            let requests: Vec<Request> = (0..n)
                .map(|i| {
                    let prompt = lengths.between(p.prompt_range.0, p.prompt_range.1);
                    let answer = lengths.between(p.answer_range.0, p.answer_range.1);
                    request(
                        1000 * n + i,
                        link.name,
                        addr,
                        link.bits_per_s,
                        ci,
                        prompt,
                        answer,
                    )
                })
                .collect();
            let cpu = cloud.cpu_seconds();
            let t0 = Instant::now();
            let barrier = Arc::new(Barrier::new(n));
            let samples: Vec<Sample> = std::thread::scope(|s| {
                let handles: Vec<_> = requests
                    .iter()
                    .map(|r| {
                        let barrier = barrier.clone();
                        s.spawn(move || {
                            barrier.wait();
                            match system {
                                System::TandemFull => replayed_tandem(r, &rates),
                                _ => run(system, r),
                            }
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("an edge thread"))
                    .collect()
            });
            // Tandem's edges finish their (replayed) compute after the fetch: the run ends at the last answer.
            let makespan = samples
                .iter()
                .map(|s| s.e2e_s)
                .fold(t0.elapsed().as_secs_f64(), f64::max);
            let run = ConcurrencyRun {
                system,
                users: n,
                makespan_s: makespan,
                cloud_cpu_s: cloud.cpu_seconds() - cpu,
                samples,
            };
            say(format!(
                "{n:>3} edges, {:<11}: {:.2} req/s, e2e p99 {:.2} s, {}/{} ok",
                system.label(),
                run.rps(),
                run.e2e(0.99),
                run.succeeded(),
                n
            ));
            concurrency.push(run);
            pb.inc(1);
        }
    }
    pb.finish_and_clear();

    let results = Results {
        command,
        quick: args.quick,
        machine,
        model: p.model.clone(),
        weights_bytes,
        link_emulation: emulator.describe(),
        loss_emulated: emulator.emulates_loss(),
        profiles: PROFILES.to_vec(),
        context_lengths: p.contexts.clone(),
        single,
        codecs,
        concurrency_link: link.describe(),
        concurrency_context: p.concurrency_context,
        edge_rates: Some(rates),
        concurrency,
        cloud_peak_rss_bytes: cloud.peak_rss(),
        cloud_prefill_s,
        notes,
        wall_s: started.elapsed().as_secs_f64(),
    };
    drop(cloud);
    drop(emulator);
    write(&results, &p.out)
}

/// One edge's prompt-prefill and decode speed with the concurrency context attached (its KV fetched losslessly).
fn edge_rates(
    e: &'static Engine,
    cloud: &CloudProcess,
    model: &str,
    id: &str,
) -> Result<EdgeRates, String> {
    let req = tandem_edge::chat::CloudContext {
        cloud_url: cloud.url(),
        model: model.into(),
        context: id.into(),
        codec: Some(Codec::Lossless),
        mode: Default::default(),
        bandwidth_bps: None,
        auth: None,
        timeout: Duration::from_secs(120),
    }
    .fetch_request(e);
    let t0 = Instant::now();
    let mut f = fetch::start(req, t0).map_err(|e| e.to_string())?;
    let mut kv = f.header.clone();
    for l in 0..e.model.config().n_layers {
        kv.layers.push(f.layer(l, t0)?);
    }
    let prompt: Vec<u32> = (0..64).map(|i| kv.tokens[i % kv.tokens.len()]).collect();
    Ok(EdgeRates::measure(e, &kv, &prompt, 32))
}

fn write(r: &Results, out: &std::path::Path) -> Result<(), String> {
    let dir = out.join("bench");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let json = serde_json::to_string_pretty(r).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("results.json"), json).map_err(|e| e.to_string())?;
    plots::write_all(r, &dir)?;
    let md = out.join("BENCHMARKS.md");
    std::fs::write(&md, report::markdown(r)).map_err(|e| e.to_string())?;
    println!(
        "{}",
        report::markdown(r)
            .split("## One user")
            .next()
            .unwrap_or_default()
    );
    println!(
        "wrote {}, {}/results.json and plots",
        md.display(),
        dir.display()
    );
    Ok(())
}
