//! The browser edge (`@tandem/edge`, edge-wasm/npm) in real headless Chromium, driven by playwright-core
//! (tests/browser/chat.mjs): the engine runs in a Web Worker, loads SmolLM2 from the local cloud with progress,
//! streams a context's KV over a real WebSocket and answers as native does, on WebGPU (Chromium's software adapter)
//! and on the wasm CPU engines; a reload reads the weights from the browser's cache; a dead cloud falls back to a
//! local prefill; poisoned cached weights are refused by hash.

use serde_json::{Value, json};
use tandem_cloud::ServeOptions;
use tandem_tests::browser::{Browser, run_plan};
use tandem_tests::cloud::TestCloud;
use tandem_tests::parity::{NEAR_TIE, assert_same_answer, native_steps};
use tandem_tests::{capture, engine};

const CONTEXT: &str = "The gateway on the third floor of the Lisbon office is a small ARM box called Gull. It caches \
the shared context for the sensors and tablets near it. Its administrator is Ana, and its backup runs at 03:00.";
const QUESTION: &str = "What does Gull cache?";
const TOKENS: usize = 16;
/// Tokens answered on Chromium's software WebGPU adapter (slow; the rest are checked on the CPU engines).
const GPU_TOKENS: usize = 2;

fn pieces(step: &Value) -> Vec<String> {
    step["pieces"]
        .as_array()
        .unwrap_or_else(|| panic!("no pieces: {step:#}"))
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn browser_engine_answers_like_native_caches_its_weights_and_falls_back() {
    let browser = Browser::find();
    let cloud = TestCloud::start(ServeOptions {
        static_dir: Some(browser.package.clone()),
        ..Default::default()
    });
    let id = cloud.register(CONTEXT);
    let native = native_steps("smollm2", CONTEXT, QUESTION, TOKENS);
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let question = json!([{ "role": "user", "content": QUESTION }]);
    let plan = json!({
        "pageUrl": format!("{}/test/index.html", cloud.url()),
        "sessions": [
            // Chromium's software WebGPU adapter: the engine runs on it. SwiftShader takes ~50 s for the prompt and
            // ~12 s per token, so this answer is short.
            { "webgpu": true, "steps": [
                { "do": "load", "cloudUrl": cloud.url(), "model": "smollm2" },
                { "do": "chat", "request": { "messages": question, "max_tokens": GPU_TOKENS,
                    "context": { "id": id, "codec": "lossless" } } },
            ]},
            // No WebGPU: the CPU engines, relaxed SIMD (threaded where built), then the plain simd128 one.
            { "webgpu": false, "steps": [
                { "do": "load", "cloudUrl": cloud.url(), "model": "smollm2" },
                { "do": "chat", "request": { "messages": question, "max_tokens": TOKENS,
                    "context": { "id": id, "codec": "lossless" } } },
                { "do": "reload" },
                // The cloud is gone: the weights come from the cache, the context's KV is computed here.
                { "do": "load", "cloudUrl": dead, "model": "smollm2" },
                { "do": "chat", "request": { "messages": question, "max_tokens": TOKENS,
                    "context": { "id": id, "text": CONTEXT, "timeoutMs": 5000 } } },
                { "do": "load", "cloudUrl": cloud.url(), "model": "smollm2", "simd": "simd128" },
                { "do": "chat", "request": { "messages": question, "max_tokens": TOKENS,
                    "context": { "id": id, "codec": "lossless" } } },
                { "do": "poison-cache" },
                { "do": "reload" },
                { "do": "load", "cloudUrl": cloud.url(), "model": "smollm2" },
                { "do": "cache-keys" },
                { "do": "load", "cloudUrl": cloud.url(), "model": "smollm2", "backend": "webgpu" },
            ]},
        ],
    });
    let report = run_plan(&browser, plan);
    let steps = |s: usize| report[s]["steps"].as_array().unwrap().clone();
    let (gpu, cpu) = (steps(0), steps(1));
    for (name, session) in [("webgpu", &gpu), ("cpu", &cpu)] {
        let times: Vec<String> = session
            .iter()
            .map(|t| format!("{} {} ms", t["do"], t["ms"]))
            .collect();
        eprintln!("{name} session: {}", times.join(", "));
    }
    eprintln!(
        "browser: load {:#}\nwebgpu turn {:#}\ncpu load {:#}\ncloud turn {:#}\noffline turn {:#}",
        gpu[0]["info"], gpu[1]["stats"], cpu[0]["info"], cpu[1]["stats"], cpu[4]["stats"]
    );

    // Loaded in a worker of a cross-origin isolated page, weights downloaded with progress, onto WebGPU.
    let load = &gpu[0];
    assert_eq!(load["ok"], true, "{load:#}");
    let info = &load["info"];
    assert_eq!(info["crossOriginIsolated"], true, "{info:#}");
    assert_eq!(info["weightsCached"], false, "{info:#}");
    assert_eq!(info["model"], "smollm2");
    assert!(
        info["webgpu"]["adapter"].is_string(),
        "Chromium with --enable-unsafe-webgpu offers an adapter: {info:#}"
    );
    assert_eq!(info["backend"], "webgpu", "{info:#}");
    assert!(
        load["progress"]["download"].as_u64().unwrap() > 10,
        "{load:#}"
    );
    assert_eq!(load["progress"]["maxLoaded"], 98_362_432u64, "{load:#}");

    // The context's KV streamed from the cloud into GPU memory; the answer is native's.
    let chat = &gpu[1];
    assert_eq!(chat["ok"], true, "{chat:#}");
    let stats = &chat["stats"];
    assert_eq!(stats["kv_source"], "cloud", "{stats:#}");
    assert_eq!(stats["codec"], "lossless", "{stats:#}");
    assert!(stats["context_tokens"].as_u64().unwrap() > 40, "{stats:#}");
    assert_eq!(stats["generated_tokens"], GPU_TOKENS, "{stats:#}");
    let (want, gaps): (Vec<String>, Vec<f32>) = native[..GPU_TOKENS].iter().cloned().unzip();
    assert!(
        gaps.iter().all(|&g| g >= NEAR_TIE),
        "native's first tokens are sure: {gaps:?}"
    );
    assert_eq!(pieces(chat), want, "browser edge on WebGPU vs native");
    assert_eq!(
        chat["engine"]["last"], *stats,
        "engine.stats() reports the last answer"
    );

    // Without WebGPU the page is told why and the CPU engine runs: relaxed SIMD, on every core where the threaded
    // engine was built (this machine's, at most 8). The weights come from the cache.
    let load = &cpu[0];
    assert_eq!(load["ok"], true, "{load:#}");
    let info = &load["info"];
    assert_eq!(info["backend"], "wasm-cpu", "{info:#}");
    assert_eq!(info["weightsCached"], true, "{info:#}");
    assert!(info["webgpu"]["adapter"].is_null(), "{info:#}");
    assert!(!info["webgpu"]["note"].as_str().unwrap().is_empty());
    assert_eq!(
        info["simd"], "relaxed-simd",
        "Chromium runs relaxed SIMD: {info:#}"
    );
    let cores = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let threaded = browser.package.join("dist/wasm-threads").exists();
    let want = if threaded { cores as u64 } else { 1 };
    assert_eq!(info["threads"], want, "kernel threads: {info:#}");
    let chat = &cpu[1];
    assert_eq!(chat["ok"], true, "{chat:#}");
    let stats = &chat["stats"];
    assert_eq!(stats["kv_source"], "cloud", "{stats:#}");
    assert!(
        stats["kv_bytes"].as_u64().unwrap() > 0 && stats["ttft_ms"].as_f64().unwrap() > 0.0,
        "{stats:#}"
    );
    assert_same_answer(&pieces(chat), &native, "browser edge on the CPU");

    // After a reload, no download; with the cloud gone, the same answer from a local prefill, and why.
    let reload = &cpu[3];
    assert_eq!(reload["ok"], true, "{reload:#}");
    assert_eq!(reload["info"]["weightsCached"], true, "{reload:#}");
    assert_eq!(reload["progress"]["download"], 0, "{reload:#}");
    let offline = &cpu[4];
    assert_eq!(offline["ok"], true, "{offline:#}");
    assert_eq!(offline["stats"]["kv_source"], "local", "{offline:#}");
    let reason = offline["stats"]["fallback_reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("cannot reach"), "{reason}");
    assert_same_answer(&pieces(offline), &native, "browser edge, local fallback");

    // The plain simd128 engine answers the same.
    assert_eq!(cpu[5]["info"]["simd"], "simd128", "{:#}", cpu[5]);
    let plain = &cpu[6];
    assert_eq!(plain["stats"]["kv_source"], "cloud", "{plain:#}");
    assert_same_answer(&pieces(plain), &native, "browser edge, simd128 engine");

    // Cached weights that no longer match the pinned hash are refused by name and dropped from the cache.
    assert_eq!(cpu[7]["poisoned"], 1, "{:#}", cpu[7]);
    let refused = &cpu[9];
    assert_eq!(refused["ok"], false, "{refused:#}");
    let error = refused["error"].as_str().unwrap();
    assert!(
        error.contains("smollm2") && error.contains("sha256"),
        "{error}"
    );
    assert_eq!(cpu[10]["keys"], json!([]), "{:#}", cpu[10]);

    // Insisting on WebGPU where there is none fails with the reason.
    let refused = &cpu[11];
    assert_eq!(refused["ok"], false, "{refused:#}");
    let error = refused["error"].as_str().unwrap();
    assert!(error.contains("WebGPU was asked for, but"), "{error}");
}

/// Privacy in the browser: everything the page, its workers and the engine send the cloud during a chat — every
/// HTTP request and the KV WebSocket, captured by a relay the page is loaded through — holds the context id and
/// none of the user's message.
#[test]
fn browser_edge_sends_no_user_data_to_the_cloud() {
    let browser = Browser::find();
    let cloud = TestCloud::start(ServeOptions {
        static_dir: Some(browser.package.clone()),
        ..Default::default()
    });
    let id = cloud.register(CONTEXT);
    let relay = capture::relay(cloud.addr);
    let via = format!("http://{}", relay.addr);
    let secret = "My bank password is hunter2, please remember Zanzibar";
    let plan = json!({
        "pageUrl": format!("{via}/test/index.html"),
        "sessions": [{ "webgpu": false, "steps": [
            { "do": "load", "cloudUrl": via, "model": "smollm2" },
            { "do": "chat", "request": { "messages": [{ "role": "user", "content": secret }], "max_tokens": 8,
                "context": { "id": id } } },
        ]}],
    });
    let report = run_plan(&browser, plan);
    let chat = &report[0]["steps"][1];
    assert_eq!(chat["ok"], true, "{chat:#}");
    assert_eq!(chat["stats"]["kv_source"], "cloud", "{chat:#}");

    let streams = relay.sent.lock().unwrap().clone();
    let mut kv_streams = 0;
    for stream in &streams {
        let sent = if stream.starts_with(b"GET /v1/kv") {
            kv_streams += 1;
            let sent = capture::unmask(stream);
            assert!(
                capture::contains(&sent, id.as_bytes()),
                "the KV request names the context"
            );
            sent
        } else {
            stream.clone()
        };
        capture::assert_holds_no_user_data(&sent, secret, engine("smollm2"));
    }
    assert_eq!(kv_streams, 1, "one KV stream");
    assert!(
        streams
            .iter()
            .any(|s| capture::contains(s, b"GET /weights/smollm2")),
        "the weights' download came through the relay too"
    );
}
