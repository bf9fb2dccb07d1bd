//! llama.cpp's side of the benchmarks: `scripts/llamacpp_bench.py` run under a Python with llama-cpp-python.

use std::process::Command;

use tandem_common::models;

/// Speeds of one engine on one model.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Measured {
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    #[serde(default)]
    pub peak_rss_bytes: u64,
}

/// llama.cpp's prefill of `ids` and decode of `decode_tokens` greedy tokens on `threads` threads, best of `repeats`.
pub fn measure_llamacpp(
    python: &str,
    model: &str,
    threads: usize,
    ids: &[u32],
    decode_tokens: usize,
    repeats: usize,
) -> Measured {
    let path = models::resolve(model).unwrap_or_else(|e| panic!("{e}"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/llamacpp_bench.py");
    let mut best = Measured {
        prefill_tok_s: 0.0,
        decode_tok_s: 0.0,
        peak_rss_bytes: 0,
    };
    for _ in 0..repeats {
        let out = Command::new(python)
            .args([
                script,
                path.to_str().expect("utf-8 path"),
                &threads.to_string(),
            ])
            .arg(serde_json::to_string(ids).expect("ids"))
            .arg(decode_tokens.to_string())
            .output()
            .unwrap_or_else(|e| panic!("running {python}: {e}"));
        assert!(
            out.status.success(),
            "llama.cpp benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let m: Measured =
            serde_json::from_slice(&out.stdout).expect("llama.cpp benchmark prints JSON");
        best.prefill_tok_s = best.prefill_tok_s.max(m.prefill_tok_s);
        best.decode_tok_s = best.decode_tok_s.max(m.decode_tok_s);
    }
    best
}
