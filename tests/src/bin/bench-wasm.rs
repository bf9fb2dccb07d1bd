//! `just bench-wasm`: decode and prefill speed of the edge runtime compiled to WebAssembly — the wasm32-wasip2
//! component under wasmtime (one thread) and the browser build (`@tandem/edge`) in headless Chromium on one and on
//! two kernel threads — against native tandem (one thread) and llama.cpp on one and two threads, measured side by
//! side in one run; the browser's peak memory (in sessions of its own: sampling it costs CPU); and the sizes of
//! every .wasm raw, gzipped and brotli'd.
//!
//! All answer the same chat prompt (prefill: its ~200 tokens over the time to first token); tandem's turns stop at
//! the end of the answer (at most 64 tokens), llama.cpp decodes 64 tokens.

use std::io::Write;

use serde_json::{Value, json};
use tandem_cloud::ServeOptions;
use tandem_common::engine::GenerateOptions;
use tandem_common::tokenizer::Message;
use tandem_edge::chat::{ContextSource, chat_turn};
use tandem_gateway::host::{self, Runtime, Weights};
use tandem_tests::browser::{Browser, run_plan};
use tandem_tests::cloud::TestCloud;
use tandem_tests::engine;
use tandem_tests::llamacpp::measure_llamacpp;

const DECODE_TOKENS: usize = 64;
const REPEATS: usize = 3;

fn question() -> String {
    let readme = include_str!("../../../README.md");
    let intro: String = readme.chars().take(600).collect();
    format!("Summarize this in one paragraph:\n\n{intro}")
}

/// Prefill and decode tok/s, each the best over `REPEATS` turns.
#[derive(Clone, Copy, Default)]
struct Rates {
    prefill: f64,
    decode: f64,
}

impl Rates {
    fn best(a: Rates, b: Rates) -> Rates {
        Rates {
            prefill: a.prefill.max(b.prefill),
            decode: a.decode.max(b.decode),
        }
    }
}

/// The component's rates.
fn component_rates(rt: &Runtime, model: &str) -> Rates {
    let mut edge = rt
        .instance(model, Weights::Cache)
        .unwrap_or_else(|e| panic!("{model} in the component: {e:#}"));
    let messages = [host::Message {
        role: "user".into(),
        content: question(),
    }];
    let context = host::ContextSource {
        cloud: None,
        text: None,
    };
    let opts = host::GenerateOptions {
        max_tokens: DECODE_TOKENS as u32,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    };
    (0..REPEATS)
        .map(|_| {
            let st = edge
                .chat(&messages, &context, opts, |_| {})
                .expect("component turn");
            Rates {
                prefill: st.prompt_tokens as f64 / (st.ttft_ms / 1e3),
                decode: st.decode_tokens_per_second,
            }
        })
        .fold(Rates::default(), Rates::best)
}

/// Native tandem's rates, and the prompt's token ids.
fn native_rates(model: &str) -> (Rates, Vec<u32>) {
    let e = engine(model);
    let messages = [Message::new("user", &question())];
    let opts = GenerateOptions {
        max_tokens: DECODE_TOKENS,
        ..Default::default()
    };
    let best = (0..REPEATS)
        .map(|_| {
            let (_, st) = chat_turn(e, &ContextSource::default(), &messages, &opts, |_, _| {})
                .expect("native turn");
            Rates {
                prefill: st.generate.prefill_tokens_per_s(),
                decode: st.generate.decode_tokens_per_s(),
            }
        })
        .fold(Rates::default(), Rates::best);
    let ids = e.tokenizer.chat_tokens(&messages, false).expect("prompt");
    (best, ids)
}

/// One browser session per model on the local cloud (the engine in its worker, wasm CPU path, `threads` kernel
/// threads): loads the model, then runs `chats` turns of the question; with `memory`, the driver samples the
/// browser's memory (PSS of all its processes), which costs CPU, so speed is measured in sessions without it.
fn browser_sessions(models: &[&str], threads: usize, chats: usize, memory: bool) -> Vec<Value> {
    let browser = Browser::find();
    let cloud = TestCloud::start(ServeOptions {
        models: models.iter().map(|m| m.to_string()).collect(),
        static_dir: Some(browser.package.clone()),
        ..Default::default()
    });
    let chat = json!({ "do": "chat", "request": {
        "messages": [{ "role": "user", "content": question() }], "max_tokens": DECODE_TOKENS } });
    let sessions: Vec<_> = models
        .iter()
        .map(|m| {
            let mut steps = vec![
                json!({ "do": "load", "cloudUrl": cloud.url(), "model": m, "threads": threads }),
            ];
            steps.extend(std::iter::repeat_n(chat.clone(), chats));
            json!({ "webgpu": false, "memory": memory, "steps": steps })
        })
        .collect();
    let plan =
        json!({ "pageUrl": format!("{}/test/index.html", cloud.url()), "sessions": sessions });
    let report = run_plan(&browser, plan);
    for session in &report {
        let steps = session["steps"].as_array().expect("steps");
        assert_eq!(
            steps[0]["info"]["threads"], threads,
            "the browser runs {threads} kernel threads: {:#}",
            steps[0]
        );
        for s in &steps[1..] {
            assert_eq!(s["ok"], true, "browser turn: {s:#}");
        }
    }
    report
}

/// Rates in headless Chromium on `threads` kernel threads, per model.
fn browser_rates(models: &[&str], threads: usize) -> Vec<Rates> {
    browser_sessions(models, threads, REPEATS, false)
        .iter()
        .map(|session| {
            session["steps"].as_array().expect("steps")[1..]
                .iter()
                .map(|s| {
                    let num = |k: &str| s["stats"][k].as_f64().expect("stats");
                    Rates {
                        prefill: num("prompt_tokens") / (num("ttft_ms") / 1e3),
                        decode: num("decode_tokens_per_second"),
                    }
                })
                .fold(Rates::default(), Rates::best)
        })
        .collect()
}

/// The browser's peak memory (bytes, PSS of all its processes) while it loads each model and answers once.
fn browser_peak_memory(models: &[&str]) -> Vec<f64> {
    browser_sessions(models, 1, 1, true)
        .iter()
        .map(|session| session["peakPss"].as_f64().expect("peakPss"))
        .collect()
}

fn print_size(what: &str, path: &std::path::Path) {
    let wasm = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (gz, br) = compressed_sizes(&wasm);
    println!(
        "{what} {}: {:.1} MB raw, {:.1} MB gzip, {:.1} MB brotli",
        path.display(),
        wasm.len() as f64 / 1e6,
        gz as f64 / 1e6,
        br as f64 / 1e6
    );
}

fn compressed_sizes(bytes: &[u8]) -> (usize, usize) {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(bytes).expect("gzip");
    let gz = gz.finish().expect("gzip").len();
    let mut br = Vec::new();
    let params = brotli::enc::BrotliEncoderParams {
        quality: 11,
        ..Default::default()
    };
    brotli::BrotliCompress(&mut &bytes[..], &mut br, &params).expect("brotli");
    (gz, br.len())
}

fn main() {
    // One thread for native tandem too, before its kernel team starts: the component has one.
    // SAFETY: nothing else runs yet.
    unsafe { std::env::set_var("TANDEM_THREADS", "1") };
    let args: Vec<String> = std::env::args().collect();
    let python = args
        .iter()
        .position(|a| a == "--llamacpp-python")
        .map(|i| args.get(i + 1).cloned().expect("--llamacpp-python PATH"));
    let path = tandem_gateway::default_component(&tandem_tests::target_dir());
    print_size("edge component", &path);
    let browser = Browser::find();
    for (what, dir) in [
        ("browser engine", "wasm"),
        ("browser engine, relaxed SIMD", "wasm-relaxed"),
        ("browser engine, threads", "wasm-threads"),
    ] {
        print_size(
            what,
            &browser
                .package
                .join("dist")
                .join(dir)
                .join("tandem_edge_bg.wasm"),
        );
    }
    let rt = Runtime::load(&path).expect("component compiles");
    let models = ["smollm2", "qwen-0.5b"];
    let one = browser_rates(&models, 1);
    let two = browser_rates(&models, 2);
    let peaks = browser_peak_memory(&models);
    let mut rows = Vec::new();
    for (((model, c1), c2), peak) in models.into_iter().zip(one).zip(two).zip(peaks) {
        let w = component_rates(&rt, model);
        let (n, ids) = native_rates(model);
        let llama = |threads| {
            python.as_deref().map(|py| {
                let m = measure_llamacpp(py, model, threads, &ids, DECODE_TOKENS, REPEATS);
                Rates {
                    prefill: m.prefill_tok_s,
                    decode: m.decode_tok_s,
                }
            })
        };
        rows.push((model, w, c1, c2, n, llama(1), llama(2), peak));
    }
    println!(
        "tok/s, best of {REPEATS}; wasm: simd128 + relaxed SIMD; 1t/2t: threads (wasmtime and native: 1 thread)"
    );
    for (what, pick) in [
        ("decode", (|r: Rates| r.decode) as fn(Rates) -> f64),
        ("prefill", |r: Rates| r.prefill),
    ] {
        println!(
            "{:<10} {:>9} {:>9} {:>9} {:>8} {:>9} {:>9} {:>14} {:>14} {:>14}",
            what,
            "wasmtime",
            "chrome 1t",
            "chrome 2t",
            "native",
            "llama 1t",
            "llama 2t",
            "wasmtime/llama",
            "chrome/llama 1t",
            "chrome/llama 2t"
        );
        for &(model, w, c1, c2, n, l1, l2, _) in &rows {
            let (l1, l2) = (l1.map(pick), l2.map(pick));
            let ratio =
                |x: f64, l: Option<f64>| l.map_or("-".to_string(), |l| format!("{:.2}x", x / l));
            let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
            println!(
                "{:<10} {:>9.1} {:>9.1} {:>9.1} {:>8.1} {:>9} {:>9} {:>14} {:>14} {:>14}",
                model,
                pick(w),
                pick(c1),
                pick(c2),
                pick(n),
                fmt(l1),
                fmt(l2),
                ratio(pick(w), l1),
                ratio(pick(c1), l1),
                ratio(pick(c2), l2)
            );
        }
    }
    for &(model, .., peak) in &rows {
        println!(
            "browser peak memory with {model}: {:.0} MB (PSS, all processes)",
            peak / 1e6
        );
    }
    if python.is_none() {
        println!("(llama.cpp not measured: pass --llamacpp-python, as `just bench-wasm` does)");
    }
}
