//! `just soak`: chat requests from many edges while connections are cut and corrupted mid-stream, chunks jitter,
//! and the cloud is killed and restarted; every answer checked against the local one. Prints the report and writes
//! it as JSON (`--out`, default target/soak/results.json). Bounded by `--requests` and `--minutes`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use tandem_tests::soak::{SoakConfig, run};

#[derive(Parser)]
#[command(
    about = "many edges chatting through cut, corrupted and jittery links while the cloud restarts"
)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    requests: usize,
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    #[arg(long, default_value_t = 8)]
    edges: usize,
    /// Share of connections cut or corrupted mid-stream.
    #[arg(long, default_value_t = 0.1)]
    fault_rate: f64,
    /// Seconds between kills of the cloud process (0: never).
    #[arg(long, default_value_t = 30.0)]
    restart_every: f64,
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// A two-minute version: 500 requests.
    #[arg(long)]
    quick: bool,
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() {
    let a = Args::parse();
    let cfg = SoakConfig {
        model: a.model,
        requests: if a.quick { 500 } else { a.requests },
        max_duration: Duration::from_secs_f64(if a.quick { 120.0 } else { a.minutes * 60.0 }),
        edges: a.edges,
        fault_rate: a.fault_rate,
        restart_every: (a.restart_every > 0.0)
            .then(|| Duration::from_secs_f64(if a.quick { 15.0 } else { a.restart_every })),
        ..SoakConfig::default()
    };
    let pb = ProgressBar::new(cfg.requests as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} requests ({per_sec})",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    let report = match run(&cfg, &|done| pb.set_position(done as u64)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(1);
        }
    };
    pb.finish_and_clear();
    println!("{}", report.summary());
    let out = a
        .out
        .unwrap_or_else(|| tandem_tests::target_dir().join("soak"));
    let written = std::fs::create_dir_all(&out).and_then(|_| {
        let json = serde_json::to_string_pretty(&report).map_err(std::io::Error::other)?;
        std::fs::write(out.join("results.json"), json)
    });
    match written {
        Ok(()) => println!("wrote {}", out.join("results.json").display()),
        Err(e) => eprintln!("soak: writing {}: {e}", out.display()),
    }
    let clean = report.wrong == 0 && report.errors.is_empty();
    std::process::exit(if clean { 0 } else { 1 });
}
