//! `tandem`: generate text with a local model, list the model cache.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tandem_common::engine::{Engine, GenerateOptions, default_device};
use tandem_common::gguf::Gguf;
use tandem_common::models;
use tandem_common::sample::SamplingParams;
use tandem_common::tokenizer::{Message, chatml};

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Cloud–edge LLM inference: local generation and model tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a reply (or a raw continuation) and stream it to stdout; timings go to stderr.
    Generate(GenerateArgs),
    /// List the pinned models and whether they are in the cache.
    Models,
    /// Run the cloud server: shared-context KV over WebSocket, OpenAI-style chat, metrics.
    Serve(Box<tandem_cloud::ServeArgs>),
    /// Chat on this machine with a shared context whose KV streams from a cloud server.
    Chat(ChatArgs),
    /// For a real context: wire bytes per token of each KV codec and its effect on the next tokens.
    CodecReport(CodecReportArgs),
    /// Measure how much each layer's keys and values matter to a model, for per-layer steps in the `pca` codecs.
    Calibrate(CalibrateArgs),
    /// Fit the alignment of a cloud LLM's context KV to an edge SLM: layer similarity, layer map, ridge projections.
    Align(AlignArgs),
    /// Score, on held-out text, what the SLM gets from the LLM's projected KV in each mode (perplexity, agreement).
    Eval(EvalArgs),
    /// Keys and tokens for a server that requires them, and a development TLS certificate.
    #[command(subcommand)]
    Auth(tandem_cloud::auth_cli::AuthCommand),
}

#[derive(Parser)]
struct AlignArgs {
    #[arg(long, default_value = "qwen-1.5b")]
    llm: String,
    #[arg(long, default_value = "qwen-0.5b")]
    slm: String,
    /// Calibration files read (a chunk from each).
    #[arg(long, default_value_t = 12)]
    chunks: usize,
    /// Held-out files scored.
    #[arg(long, default_value_t = 6)]
    held_out: usize,
    #[arg(long, default_value_t = 384)]
    chunk_tokens: usize,
    /// Fused-mode gates: calibration chunks scored per trial, tokens scored at the end of each, bands of layers
    /// sharing a gate.
    #[arg(long, default_value_t = 12)]
    gate_chunks: usize,
    #[arg(long, default_value_t = 64)]
    gate_tokens: usize,
    #[arg(long, default_value_t = 4)]
    gate_bands: usize,
    /// Where the artifact (alignment.bin), calibration.json, similarity.png and report.txt go.
    #[arg(long, default_value = "target/align")]
    out: PathBuf,
}

#[derive(Parser)]
struct EvalArgs {
    #[arg(long, default_value = "qwen-1.5b")]
    llm: String,
    #[arg(long, default_value = "qwen-0.5b")]
    slm: String,
    /// The artifact `tandem align` wrote.
    #[arg(long, default_value = "target/align/alignment.bin")]
    alignment: PathBuf,
    #[arg(long, default_value_t = 6)]
    files: usize,
    #[arg(long, default_value_t = 256)]
    context_tokens: usize,
    #[arg(long, default_value_t = 48)]
    continuation_tokens: usize,
    /// Split points: the SLM computes this many lowest layers, the rest come projected (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [6, 12, 18])]
    splits: Vec<usize>,
    /// Where eval.md, eval.json and perplexity.svg go.
    #[arg(long, default_value = "target/eval")]
    out: PathBuf,
}

#[derive(Parser)]
struct CodecReportArgs {
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// The shared context (default: this project's README).
    #[arg(long)]
    context_file: Option<PathBuf>,
    /// Tokens compared per question.
    #[arg(long, default_value_t = 64)]
    steps: usize,
    /// Ask this after the context (repeatable; default: three standard questions). One flipped token moves the
    /// agreement by 1 / (questions × steps): more questions, a finer probe.
    #[arg(long = "question")]
    questions: Vec<String>,
    /// Mat-mul precision of both runs: f32 isolates the codec; q8 (the fast path) adds activation-rounding flips.
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Only these codecs (repeatable; default: all).
    #[arg(long = "codec")]
    codecs: Vec<tandem_common::codec::Codec>,
    /// Per-layer steps for the pca codecs: a `tandem calibrate` profile, or `uniform` (default: the model's
    /// profile when it has one).
    #[arg(long)]
    steps_profile: Option<String>,
}

#[derive(Parser)]
struct CalibrateArgs {
    #[arg(long, default_value = "qwen-0.5b")]
    model: String,
    /// The context the questions are asked after (default: this project's ARCHITECTURE.md, so that
    /// codec-report's default, the README, stays held out).
    #[arg(long)]
    context_file: Option<PathBuf>,
    /// Context tokens used, from its start.
    #[arg(long, default_value_t = 2400)]
    context_tokens: usize,
    /// Tokens scored per question and measurement.
    #[arg(long, default_value_t = 48)]
    steps: usize,
    /// Where to write the profile (default: beside the model's weights, where servers find it).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Parser)]
struct ChatArgs {
    /// The cloud server, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    cloud: Option<String>,
    /// The shared context's id on the cloud.
    #[arg(long)]
    context: Option<String>,
    /// The context's text, for a local fallback when the cloud cannot serve it (or to run without a cloud).
    #[arg(long)]
    context_file: Option<PathBuf>,
    /// Model on this machine; the cloud must serve the same one under the same name.
    #[arg(long, default_value = "smollm2")]
    model: String,
    #[arg(long)]
    prompt: String,
    /// Insist on a KV codec (lossless, f16, q8, pca8, q4, pca4, pca3, pca2, q2); by default the cloud picks.
    #[arg(long)]
    codec: Option<tandem_common::codec::Codec>,
    /// Whose reading of the context: exact (the edge model's own KV), split:K (K lowest layers computed here, the
    /// rest the cloud LLM's KV projected) or fused (own KV plus the projected, gated); the projected modes need a
    /// cloud serving an alignment (tandem serve --alignment).
    #[arg(long, default_value = "exact")]
    kv_mode: tandem_common::wire::KvMode,
    /// This edge's download bandwidth in Mbit/s, reported to the cloud for its codec choice (default: none, or in a
    /// long-lived edge the rate its last stream was delivered at).
    #[arg(long)]
    bandwidth_mbps: Option<f64>,
    /// The token the cloud asks for (`tandem auth token`).
    #[arg(long, env = "TANDEM_TOKEN")]
    token: Option<String>,
    /// Also trust this certificate (PEM) for an https:// cloud: a development cloud's self-signed one.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Seconds to wait for the cloud (connection, header, each layer) before computing the context locally.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
}

#[derive(Parser)]
struct GenerateArgs {
    /// Model: smollm2, qwen-0.5b, qwen-1.5b, or a path to a .gguf file.
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// The user's message (or, with --raw, the text to continue).
    #[arg(long)]
    prompt: String,
    /// A shared context (document, system prompt) to put before the prompt, as the system message.
    #[arg(long)]
    context_file: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue the prompt text as is, without the chat template.
    #[arg(long)]
    raw: bool,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Generate(args) => generate(args),
        Command::Serve(args) => tandem_cloud::run_server(*args, "tandem cloud"),
        Command::Chat(args) => chat(args),
        Command::CodecReport(args) => codec_report(args),
        Command::Calibrate(args) => calibrate(args),
        Command::Auth(cmd) => tandem_cloud::auth_cli::run(cmd),
        Command::Align(args) => align(args),
        Command::Eval(args) => eval(args),
        Command::Models => {
            let dir = models::cache_dir();
            println!("model cache: {}", dir.display());
            for m in models::registry() {
                let state = match models::resolve(&m.name) {
                    Ok(_) => "cached".to_string(),
                    Err(models::ModelLookupError::NotFetched { .. }) => "not fetched".to_string(),
                    Err(e) => format!("bad: {e}"),
                };
                println!(
                    "{:<10} {:>8.1} MB  {:<12} {}",
                    m.name,
                    m.size as f64 / 1e6,
                    state,
                    m.title
                );
            }
            Ok(())
        }
    }
}

fn generate(args: GenerateArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&args.top_p) || args.top_p == 0.0 {
        bail!("--top-p must be in (0, 1], got {}", args.top_p);
    }
    if args.temperature < 0.0 {
        bail!("--temperature must be ≥ 0, got {}", args.temperature);
    }
    let path = models::resolve(&args.model)?;
    let spinner = ProgressBar::new_spinner()
        .with_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}")?);
    spinner.set_message(format!("loading {}", path.display()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(100));
    let t_load = Instant::now();
    let gguf = Gguf::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let engine = Engine::load(&gguf, &default_device())
        .with_context(|| format!("loading {}", path.display()))?;
    spinner.finish_and_clear();
    eprintln!(
        "loaded {} in {:.2}s",
        path.display(),
        t_load.elapsed().as_secs_f64()
    );

    let text = if args.raw {
        let mut t = String::new();
        if let Some(f) = &args.context_file {
            t.push_str(
                &std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
            );
        }
        t.push_str(&args.prompt);
        t
    } else {
        let mut msgs = Vec::new();
        if let Some(f) = &args.context_file {
            msgs.push(Message::new(
                "system",
                &std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
            ));
        }
        msgs.push(Message::new("user", &args.prompt));
        chatml(&msgs, true)
    };
    let mut tokens = engine.tokenizer.encode(&text)?;
    if engine.tokenizer.add_bos
        && let Some(bos) = engine.tokenizer.bos
    {
        tokens.insert(0, bos);
    }
    let opts = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            seed: args.seed,
        },
        stop_at_eos: !args.raw,
        ..Default::default()
    };
    let mut session = engine.session();
    let mut stdout = std::io::stdout().lock();
    let (_, stats) = engine.generate(&mut session, &tokens, &opts, |_, piece| {
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
    })?;
    println!();
    eprintln!(
        "prompt {} tokens, TTFT {:.0} ms ({:.1} tok/s prefill); generated {} tokens, {:.1} tok/s decode",
        stats.prompt_tokens,
        stats.ttft.as_secs_f64() * 1e3,
        stats.prefill_tokens_per_s(),
        stats.generated_tokens,
        stats.decode_tokens_per_s()
    );
    Ok(())
}

/// A model by registry name or GGUF path, loaded on the default device.
fn open_model(name: &str) -> Result<Engine> {
    open_model_at(name).map(|(_, engine)| engine)
}

/// The model's weights file and the model.
fn open_model_at(name: &str) -> Result<(PathBuf, Engine)> {
    let path = models::resolve(name)?;
    let engine = Engine::open(&path, &default_device())
        .with_context(|| format!("loading {}", path.display()))?;
    Ok((path, engine))
}

fn align(args: AlignArgs) -> Result<()> {
    use tandem_cloud::align;
    let (llm, slm) = (open_model(&args.llm)?, open_model(&args.slm)?);
    let manifest = align::calibration::Manifest::discover()?;
    eprintln!(
        "calibration text: {} files ({})",
        manifest.files.len(),
        manifest
            .roots
            .iter()
            .map(|(k, p)| format!("{k:?}: {}", p.display()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let opts = align::FitOptions {
        calibration_chunks: args.chunks,
        held_out_chunks: args.held_out,
        chunk_tokens: args.chunk_tokens,
        gate_chunks: args.gate_chunks,
        gate_tokens: args.gate_tokens,
        gate_bands: args.gate_bands,
    };
    let t0 = Instant::now();
    let fitted = align::fit(&llm, &slm, &manifest, opts, &mut |m| {
        eprintln!("[{:>5.1} s] {m}", t0.elapsed().as_secs_f64())
    })?;
    let report = align::save(&fitted, &manifest, &args.out)?;
    println!("{report}");
    println!(
        "wrote {}/{{alignment.bin, calibration.json, similarity.png, report.txt}}",
        args.out.display()
    );
    Ok(())
}

fn eval(args: EvalArgs) -> Result<()> {
    use tandem_cloud::align::{self, eval};
    let alignment = align::Alignment::load(&args.alignment)
        .with_context(|| format!("{} (run `just align` first)", args.alignment.display()))?;
    let (llm, slm) = (open_model(&args.llm)?, open_model(&args.slm)?);
    let manifest = align::calibration::Manifest::discover()?;
    let here = manifest.hash();
    anyhow::ensure!(
        here == alignment.calibration,
        "this machine's calibration text differs from the alignment's (manifest {} vs {}): its held-out set may \
         overlap the files it was fitted on; refit with `just align`",
        &here[..16],
        &alignment.calibration[..16.min(alignment.calibration.len())]
    );
    let opts = eval::EvalOptions {
        files: args.files,
        context_tokens: args.context_tokens,
        continuation_tokens: args.continuation_tokens,
        splits: args.splits,
    };
    let t0 = Instant::now();
    let results = eval::evaluate(&llm, &slm, &alignment, &manifest, &opts, &mut |m| {
        eprintln!("[{:>5.1} s] {m}", t0.elapsed().as_secs_f64())
    })?;
    let table = eval::markdown(&results, &opts, &alignment.id());
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("eval.md"), &table)?;
    std::fs::write(
        args.out.join("eval.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(args.out.join("perplexity.svg"), eval::svg(&results.modes))?;
    println!("{table}");
    println!(
        "wrote {}/{{eval.md, eval.json, perplexity.svg}}",
        args.out.display()
    );
    Ok(())
}

fn chat(args: ChatArgs) -> Result<()> {
    use tandem_edge::chat::{CloudContext, ContextSource, KvSource, chat_turn};
    if let Some(ca) = &args.ca {
        tandem_cloud::trust_ca_file(ca)?;
    }
    let engine = open_model(&args.model)?;
    let cloud = match (&args.cloud, &args.context) {
        (Some(url), Some(id)) => Some(CloudContext {
            cloud_url: url.clone(),
            model: args.model.clone(),
            context: id.clone(),
            codec: args.codec,
            mode: args.kv_mode,
            bandwidth_bps: args.bandwidth_mbps.map(|m| (m * 1e6) as u64),
            auth: args.token.clone(),
            timeout: std::time::Duration::from_secs_f64(args.timeout),
        }),
        (None, None) => None,
        _ => bail!("--cloud and --context go together"),
    };
    let text = match &args.context_file {
        Some(f) => {
            Some(std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?)
        }
        None => None,
    };
    let opts = GenerateOptions {
        max_tokens: args.max_tokens,
        ..Default::default()
    };
    let mut stdout = std::io::stdout().lock();
    let (_, stats) = chat_turn(
        &engine,
        &ContextSource { cloud, text },
        &[Message::new("user", &args.prompt)],
        &opts,
        |_, piece| {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        },
    )?;
    println!();
    let source = match &stats.source {
        KvSource::Cloud {
            codec,
            mode,
            alignment,
        } => format!(
            "context KV from the cloud ({mode}{}, {codec}, {:.1} KB, all layers after {:.0} ms)",
            alignment
                .as_deref()
                .map(|a| format!(" by alignment {a}"))
                .unwrap_or_default(),
            stats.kv.kv_bytes as f64 / 1e3,
            stats.kv.done_after.as_secs_f64() * 1e3
        ),
        KvSource::Local { reason } => format!("context computed locally ({reason})"),
        KvSource::None => "no context".into(),
    };
    eprintln!(
        "{source}; context {} tokens, prompt {} tokens; TTFT {:.0} ms; generated {} tokens, {:.1} tok/s",
        stats.context_tokens,
        stats.generate.prompt_tokens,
        stats.ttft.as_secs_f64() * 1e3,
        stats.generate.generated_tokens,
        stats.generate.decode_tokens_per_s()
    );
    Ok(())
}

fn codec_report(args: CodecReportArgs) -> Result<()> {
    use tandem_cloud::kv_steps::{QUESTIONS, StepProfile};
    let precision = parse_precision(&args.precision)?;
    let (path, engine) = open_model_at(&args.model)?;
    let text = read_context(
        args.context_file.as_deref(),
        include_str!("../../../README.md"),
    )?;
    let (profile, steps_from) = match args.steps_profile.as_deref() {
        Some("uniform") => (None, "uniform".to_string()),
        Some(file) => (
            Some(StepProfile::load(std::path::Path::new(file), &engine)?),
            file.to_string(),
        ),
        None => match StepProfile::load_for(&path, &engine)? {
            Some(p) => {
                let from = tandem_cloud::kv_steps::path_for(&path)
                    .display()
                    .to_string();
                (Some(p), from)
            }
            None => (None, "uniform (the model has no calibrated profile)".into()),
        },
    };
    let codecs = if args.codecs.is_empty() {
        tandem_common::codec::Codec::ALL.to_vec()
    } else {
        args.codecs
    };
    let questions: Vec<&str> = match args.questions.is_empty() {
        true => QUESTIONS.to_vec(),
        false => args.questions.iter().map(String::as_str).collect(),
    };
    eprintln!(
        "measuring {} codecs on {} context tokens, {} questions × {} tokens, {:?} mat-muls; pca steps: {steps_from} …",
        codecs.len(),
        engine.tokenizer.context_tokens(&text)?.len(),
        questions.len(),
        args.steps,
        precision
    );
    let rows = tandem_cloud::codec_report::codec_report(
        &engine,
        &text,
        &questions,
        args.steps,
        precision,
        &codecs,
        profile.as_ref().map(|p| &p.scales),
    )?;
    println!(
        "{:<9} {:>12} {:>12} {:>10} {:>11} {:>11} {:>13} {:>11} {:>11} {:>11}",
        "codec",
        "bytes",
        "bytes/token",
        "vs f16",
        "top-1 agree",
        "flips",
        "loss, 95%",
        "|Δ log p|",
        "encode ms",
        "decode ms"
    );
    for r in rows {
        let (lo, hi) = r.score.loss_interval();
        println!(
            "{:<9} {:>12} {:>12.0} {:>9.1}x {:>10.2}% {:>11} {:>13} {:>11.4} {:>11.1} {:>11.1}",
            r.codec.to_string(),
            r.bytes,
            r.bytes_per_token,
            r.smaller_than_f16,
            r.score.agreement() * 100.0,
            format!("{}/{}", r.score.flips, r.score.scored),
            format!("{:.2}–{:.2}%", lo * 100.0, hi * 100.0),
            r.score.logprob_shift,
            r.encode_ms,
            r.decode_ms
        );
    }
    Ok(())
}

fn calibrate(args: CalibrateArgs) -> Result<()> {
    use tandem_common::quant::Precision;
    let (path, engine) = open_model_at(&args.model)?;
    let text = read_context(
        args.context_file.as_deref(),
        include_str!("../../../ARCHITECTURE.md"),
    )?;
    let out = args
        .out
        .unwrap_or_else(|| tandem_cloud::kv_steps::path_for(&path));
    let layers = engine.model.config().n_layers;
    let mut tokens = engine.tokenizer.context_tokens(&text)?;
    tokens.truncate(args.context_tokens);
    eprintln!(
        "calibrating {}: {} context tokens, {} questions × {} tokens, each layer's keys and values coded alone ({} runs) …",
        args.model,
        tokens.len(),
        tandem_cloud::kv_steps::QUESTIONS.len(),
        args.steps,
        2 * layers
    );
    let bar = ProgressBar::new(2 * layers as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} runs, {elapsed} (eta {eta})")
            .expect("a valid template"),
    );
    let profile = tandem_cloud::kv_steps::calibrate(
        &engine,
        &tokens,
        &tandem_cloud::kv_steps::QUESTIONS,
        args.steps,
        Precision::F32,
        &mut |done, _| bar.set_position(done as u64),
    )?;
    bar.finish_and_clear();
    println!("layer  keys: |Δ log p|  step ×   values: |Δ log p|  step ×");
    for l in 0..layers {
        println!(
            "{l:>5} {:>17.4} {:>7.2} {:>19.4} {:>7.2}",
            profile.key_sensitivity[l],
            profile.scales.keys[l],
            profile.value_sensitivity[l],
            profile.scales.values[l]
        );
    }
    profile
        .save(&out)
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn parse_precision(name: &str) -> Result<tandem_common::quant::Precision> {
    use tandem_common::quant::Precision;
    match name {
        "f32" => Ok(Precision::F32),
        "q8" => Ok(Precision::Q8),
        other => bail!("--precision is f32 or q8, not {other:?}"),
    }
}

/// The text of `file`, else `default`.
fn read_context(file: Option<&std::path::Path>, default: &str) -> Result<String> {
    match file {
        Some(f) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display())),
        None => Ok(default.to_string()),
    }
}
