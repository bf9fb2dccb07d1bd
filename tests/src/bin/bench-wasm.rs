//! `just bench-wasm`: decode speed of the edge runtime compiled to WebAssembly — the wasm32-wasip2 component under
//! wasmtime and the browser build (`@tandem/edge`) in headless Chromium, each on one thread — against native tandem
//! and llama.cpp, both on one thread, measured side by side in one run; the browser's peak memory; and the sizes
//! of both .wasm files raw, gzipped and brotli'd.
//!
//! All three answer the same chat prompt; tandem's turns stop at the end of the answer (at most 64 tokens),
//! llama.cpp decodes 64 tokens.

use std::io::Write;
use std::path::PathBuf;

use serde_json::json;
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

/// Best decode rate of the component over `REPEATS` turns.
fn component_decode(rt: &Runtime, model: &str) -> f64 {
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
            edge.chat(&messages, &context, opts.clone(), |_| {})
                .expect("component turn")
                .decode_tokens_per_second
        })
        .fold(0.0, f64::max)
}

/// Best decode rate of native tandem over `REPEATS` turns, and the prompt's token ids.
fn native_decode(model: &str) -> (f64, Vec<u32>) {
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
            st.generate.decode_tokens_per_s()
        })
        .fold(0.0, f64::max);
    let ids = e.tokenizer.chat_tokens(&messages, false).expect("prompt");
    (best, ids)
}

/// Best decode rate in headless Chromium over `REPEATS` turns (the engine in its worker, wasm CPU path), and the
/// browser's peak memory (PSS of all its processes), per model.
fn browser_decode(models: &[&str]) -> Vec<(f64, f64)> {
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
            let mut steps = vec![json!({ "do": "load", "cloudUrl": cloud.url(), "model": m })];
            steps.extend(std::iter::repeat_n(chat.clone(), REPEATS));
            json!({ "webgpu": false, "steps": steps })
        })
        .collect();
    let plan =
        json!({ "pageUrl": format!("{}/test/index.html", cloud.url()), "sessions": sessions });
    run_plan(&browser, plan)
        .iter()
        .map(|session| {
            let steps = session["steps"].as_array().expect("steps");
            let best = steps[1..]
                .iter()
                .map(|s| {
                    assert_eq!(s["ok"], true, "browser turn: {s:#}");
                    s["stats"]["decode_tokens_per_second"]
                        .as_f64()
                        .expect("tok/s")
                })
                .fold(0.0, f64::max);
            (best, session["peakPss"].as_f64().unwrap_or(0.0))
        })
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
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    let path = tandem_gateway::default_component(&target);
    print_size("edge component", &path);
    let browser = Browser::find();
    print_size(
        "browser engine",
        &browser.package.join("dist/wasm/tandem_edge_bg.wasm"),
    );
    let rt = Runtime::load(&path).expect("component compiles");
    let models = ["smollm2", "qwen-0.5b"];
    let chromium = browser_decode(&models);
    println!(
        "decode tok/s on 1 thread, best of {REPEATS} (wasm: simd128; wasmtime adds relaxed SIMD)"
    );
    println!(
        "{:<10} {:>9} {:>9} {:>8} {:>10} {:>15} {:>15} {:>13}",
        "model",
        "wasmtime",
        "chromium",
        "native",
        "llama.cpp",
        "wasmtime/llama",
        "chromium/llama",
        "browser peak"
    );
    for (model, (c, peak)) in models.into_iter().zip(chromium) {
        let w = component_decode(&rt, model);
        let (n, ids) = native_decode(model);
        let l = python
            .as_deref()
            .map(|py| measure_llamacpp(py, model, 1, &ids, DECODE_TOKENS, REPEATS).decode_tok_s);
        let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        let ratio = |x: f64| l.map_or("-".to_string(), |l| format!("{:.2}x", x / l));
        println!(
            "{:<10} {:>9.1} {:>9.1} {:>8.1} {:>10} {:>15} {:>15} {:>10.0} MB",
            model,
            w,
            c,
            n,
            fmt(l),
            ratio(w),
            ratio(c),
            peak / 1e6
        );
    }
    if python.is_none() {
        println!("(llama.cpp not measured: pass --llamacpp-python, as `just bench-wasm` does)");
    }
}
