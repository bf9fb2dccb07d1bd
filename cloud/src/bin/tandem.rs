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
