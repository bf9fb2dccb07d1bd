//! `just bench-stream`: time to first token of an edge answering after a long shared context, over an emulated
//! 100 Mb/s, 20 ms RTT link: context KV streamed from the cloud and pipelined with the prompt's prefill, vs the same
//! stream without pipelining, vs prefilling the context locally. Also wire bytes per context token for each codec.
//! All measured side by side in one run.
//!
//! `--model NAME` (default qwen-0.5b), `--context-tokens N` (2048), `--prompt-tokens N` (32), `--quick`
//! (smollm2, 512 tokens).

use std::time::{Duration, Instant};

use tandem_cloud::ServeOptions;
use tandem_common::codec::Codec;
use tandem_common::engine::{Engine, GenerateOptions};
use tandem_common::tokenizer::Message;
use tandem_edge::chat::{CloudContext, ContextSource, KvSource, chat_turn};
use tandem_edge::fetch;
use tandem_tests::cloud::TestCloud;
use tandem_tests::shaper::{Link, shaped_relay};
use tandem_tests::{engine, http};

struct Args {
    model: String,
    context_tokens: usize,
    prompt_tokens: usize,
}

fn args() -> Args {
    let mut a = Args {
        model: "qwen-0.5b".into(),
        context_tokens: 2048,
        prompt_tokens: 32,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let value = || argv.get(i + 1).cloned().expect("option needs a value");
        match argv[i].as_str() {
            "--model" => a.model = value(),
            "--context-tokens" => a.context_tokens = value().parse().expect("a number"),
            "--prompt-tokens" => a.prompt_tokens = value().parse().expect("a number"),
            "--quick" => {
                a.model = "smollm2".into();
                a.context_tokens = 512;
                i -= 1;
            }
            other => panic!("unknown option {other}"),
        }
        i += 2;
    }
    a
}

/// Real text no one here wrote for the benchmark: this repository's own sources, cut to `n` tokens.
fn text_of_tokens(e: &Engine, n: usize) -> String {
    let corpus = [
        include_str!("../../../common/src/model/mod.rs"),
        include_str!("../../../common/src/gguf.rs"),
        include_str!("../../../common/src/quant/dot.rs"),
        include_str!("../../../common/src/tokenizer.rs"),
        include_str!("../../../cloud/src/server.rs"),
    ]
    .concat();
    let ids = e.tokenizer.encode(&corpus).expect("tokenizes");
    assert!(ids.len() >= n, "corpus has only {} tokens", ids.len());
    e.tokenizer.decode(&ids[..n]).expect("decodes")
}

fn main() {
    let a = args();
    let e = engine(&a.model);
    let link = Link {
        bits_per_s: 100e6,
        one_way: Duration::from_millis(10),
    };
    let threads = tandem_common::parallel::threads();
    println!(
        "bench-stream: {}, shared context {} tokens, user prompt {} tokens, link {}, {threads} threads",
        a.model,
        a.context_tokens,
        a.prompt_tokens,
        link.describe()
    );

    let context = text_of_tokens(e, a.context_tokens - 8);
    let prompt_text = text_of_tokens(e, a.prompt_tokens - 10);
    let messages = vec![Message::new("user", &prompt_text)];
    let cloud = TestCloud::start(ServeOptions {
        models: vec![a.model.clone()],
        ..Default::default()
    });
    let t0 = Instant::now();
    let id = cloud.register(&context);
    println!(
        "cloud prefilled the context once in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    // Encodes every codec once (cached for all edges) and reports the sizes.
    let (_, status) = http::request(cloud.addr, "GET", &format!("/v1/contexts/{id}"), "");
    let info: serde_json::Value = serde_json::from_str(&status).expect("context JSON");
    let n_ctx = info["tokens"].as_u64().expect("tokens") as f64;
    let relay = shaped_relay(cloud.addr, link);
    let one = GenerateOptions {
        max_tokens: 1,
        ..Default::default()
    };
    let cloud_ctx = |codec: Option<Codec>| CloudContext {
        cloud_url: format!("http://{relay}"),
        model: a.model.clone(),
        context: id.clone(),
        codec,
        mode: Default::default(),
        bandwidth_bps: Some(link.bits_per_s as u64),
        auth: None,
        timeout: Duration::from_secs(120),
    };

    // Local: the context prefilled on this machine.
    let local = ContextSource {
        cloud: None,
        text: Some(context.clone()),
    };
    let (_, st_local) = chat_turn(e, &local, &messages, &one, |_, _| {}).expect("local turn");
    let ttft_local = st_local.ttft.as_secs_f64();

    // The prompt's own compute with the context already present: the floor for any cloud path.
    let exact = e
        .prefill_kv(&e.tokenizer.context_tokens(&context).expect("tokens"))
        .expect("prefill");
    let prompt = e.tokenizer.chat_tokens(&messages, true).expect("tokens");
    let mut t_compute = f64::MAX;
    for _ in 0..2 {
        let mut s = e.session();
        s.attach_context(&exact).expect("attach");
        let t = Instant::now();
        s.prefill(&prompt).expect("prefill");
        t_compute = t_compute.min(t.elapsed().as_secs_f64());
    }

    println!(
        "\n{:<10} {:>12} {:>14} {:>12} {:>14} {:>10} {:>12}",
        "codec", "bytes/token", "vs fp16", "T_load s", "TTFT piped s", "÷ max(T)", "TTFT seq s"
    );
    // A plain fp16 cache: K and V, every layer, 2 bytes a value.
    let c = e.model.config();
    let fp16 = n_ctx * (c.n_layers * 2 * c.n_kv_heads * c.head_dim * 2) as f64;
    let mut adaptive = None;
    for codec in [
        None,
        Some(Codec::F16),
        Some(Codec::Q8),
        Some(Codec::Pca8),
        Some(Codec::Q4),
        Some(Codec::Pca4),
        Some(Codec::Pca3),
        Some(Codec::Pca2),
        Some(Codec::Q2),
    ] {
        let src = ContextSource {
            cloud: Some(cloud_ctx(codec)),
            text: None,
        };
        let (_, st) = chat_turn(e, &src, &messages, &one, |_, _| {}).expect("cloud turn");
        let KvSource::Cloud { codec: used, .. } = st.source else {
            panic!("the cloud path fell back: {:?}", st.source)
        };
        let ttft = st.ttft.as_secs_f64();
        let t_load = st.kv.done_after.as_secs_f64();
        let seq = sequential_ttft(e, &cloud_ctx(Some(used)), &prompt);
        let name = match codec {
            None => format!("{used} (auto)"),
            Some(c) => c.to_string(),
        };
        println!(
            "{:<10} {:>12.0} {:>13.1}x {:>12.3} {:>14.3} {:>10.2} {:>12.3}",
            name,
            st.kv.kv_bytes as f64 / n_ctx,
            fp16 / st.kv.kv_bytes as f64,
            t_load,
            ttft,
            ttft / t_load.max(t_compute),
            seq
        );
        if codec.is_none() {
            adaptive = Some((ttft, seq, t_load));
        }
    }
    let (ttft, seq, t_load) = adaptive.expect("measured");
    println!("\nlocal prefill of the context + prompt: TTFT {ttft_local:.3} s");
    println!("prompt prefill alone (context present): T_compute {t_compute:.3} s");
    println!(
        "cloud KV, pipelined (auto codec): TTFT {ttft:.3} s = {:.1}x faster than local, {:.2}x faster than without pipelining; TTFT / max(T_load {t_load:.3}, T_compute {t_compute:.3}) = {:.2}",
        ttft_local / ttft,
        seq / ttft,
        ttft / t_load.max(t_compute)
    );
    println!(
        "(agreement of each codec with exact KV: `cargo test --release -p tandem-tests --test cloud_edge quantized -- --nocapture`)"
    );
}

/// TTFT without pipelining: every layer received first, then the prompt prefilled.
fn sequential_ttft(e: &Engine, c: &CloudContext, prompt: &[u32]) -> f64 {
    let t0 = Instant::now();
    let mut f = fetch::start(c.fetch_request(e), t0).expect("fetch");
    let mut kv = f.header.clone();
    for l in 0..e.model.config().n_layers {
        kv.layers.push(f.layer(l, t0).expect("layer"));
    }
    let mut s = e.session();
    s.attach_context(&kv).expect("attach");
    let logits = s.prefill(prompt).expect("prefill");
    let _ = tandem_common::sample::argmax(&logits);
    t0.elapsed().as_secs_f64()
}
