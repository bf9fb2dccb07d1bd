//! `just bench-decode`: decode and prefill speed of tandem vs llama.cpp on the same GGUF and thread count, measured
//! side by side in one run, and tandem's peak resident memory against the GGUF's size.
//!
//! Each model is measured in a child process (`--one MODEL`) so peak RSS belongs to that model alone.

use std::process::Command;
use std::time::Instant;

use tandem_common::engine::{Engine, default_device};
use tandem_common::models;
use tandem_common::sample::argmax;
use tandem_tests::llamacpp::{Measured, measure_llamacpp};

const PROMPT_TOKENS: usize = 128;
const DECODE_TOKENS: usize = 64;
const REPEATS: usize = 3;

/// Prompt ids: real text, cycled to `PROMPT_TOKENS`.
fn prompt_ids(e: &Engine) -> Vec<u32> {
    let text = include_str!("../../../README.md");
    let ids = e.tokenizer.encode(text).expect("README tokenizes");
    ids.iter().cycle().take(PROMPT_TOKENS).copied().collect()
}

fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
                    * 1024
            })
        })
        .unwrap_or(0)
}

fn measure_tandem(model: &str) -> (Measured, Vec<u32>) {
    let path = models::resolve(model).unwrap_or_else(|e| panic!("{e}"));
    let engine = Engine::open(&path, &default_device()).expect("model loads");
    let ids = prompt_ids(&engine);
    let (mut best_prefill, mut best_decode) = (0f64, 0f64);
    for _ in 0..REPEATS {
        let mut s = engine.session();
        let t0 = Instant::now();
        let mut logits = s.prefill(&ids).expect("prefill");
        best_prefill = best_prefill.max(ids.len() as f64 / t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        for _ in 0..DECODE_TOKENS {
            logits = s.decode(argmax(&logits)).expect("decode");
        }
        best_decode = best_decode.max(DECODE_TOKENS as f64 / t0.elapsed().as_secs_f64());
    }
    (
        Measured {
            prefill_tok_s: best_prefill,
            decode_tok_s: best_decode,
            peak_rss_bytes: peak_rss(),
        },
        ids,
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 3 && args[1] == "--one" {
        let (m, ids) = measure_tandem(&args[2]);
        println!("{}", serde_json::to_string(&(m, ids)).expect("json"));
        return;
    }
    let python = match args.iter().position(|a| a == "--llamacpp-python") {
        Some(i) => args.get(i + 1).cloned().expect("--llamacpp-python PATH"),
        None => "python3".into(),
    };
    let threads = tandem_common::parallel::threads();
    println!(
        "tandem vs llama.cpp, {threads} threads, prompt {PROMPT_TOKENS} tokens, decode {DECODE_TOKENS} tokens, best of {REPEATS}"
    );
    println!(
        "{:<10} {:>13} {:>13} {:>7} {:>14} {:>14} {:>7} {:>11} {:>9}",
        "model",
        "decode tok/s",
        "llama.cpp",
        "ratio",
        "prefill tok/s",
        "llama.cpp",
        "ratio",
        "peak RSS",
        "÷ GGUF"
    );
    for model in ["smollm2", "qwen-0.5b"] {
        let me = std::env::current_exe().expect("own path");
        let out = Command::new(me)
            .args(["--one", model])
            .output()
            .expect("child runs");
        assert!(
            out.status.success(),
            "tandem measurement of {model} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (t, ids): (Measured, Vec<u32>) =
            serde_json::from_slice(&out.stdout).expect("child prints JSON");
        let l = measure_llamacpp(&python, model, threads, &ids, DECODE_TOKENS, REPEATS);
        let gguf = models::spec(model).expect("registered").size as f64;
        println!(
            "{:<10} {:>13.1} {:>13.1} {:>6.2}x {:>14.1} {:>14.1} {:>6.2}x {:>8.0} MB {:>8.2}x",
            model,
            t.decode_tok_s,
            l.decode_tok_s,
            t.decode_tok_s / l.decode_tok_s,
            t.prefill_tok_s,
            l.prefill_tok_s,
            t.prefill_tok_s / l.prefill_tok_s,
            t.peak_rss_bytes as f64 / 1e6,
            t.peak_rss_bytes as f64 / gguf
        );
    }
}
