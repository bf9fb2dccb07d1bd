//! The chat page (web/) in headless Chromium, used like a user would (tests/browser/page.mjs): served by a real
//! cloud, model downloaded once and then read from the browser's cache, a shared context picked, a question typed,
//! the answer streamed, the live panel filled; and, with the cloud killed as the question is sent, the answer
//! finished locally with the page saying so.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use tandem_cloud::ServeOptions;
use tandem_tests::browser::{Browser, run_driver};
use tandem_tests::cloud::TestCloud;
use tandem_tests::{repo_root, target_dir};

const QUESTION: &str = "What does the gateway cache?";

/// The built page (`just web`).
fn page_dir() -> PathBuf {
    let dir = repo_root().join("web/dist");
    assert!(
        dir.join("index.html").exists() && dir.join("pkg/index.js").exists(),
        "the chat page is not built: run `just web`"
    );
    dir
}

/// A shared context of a few hundred tokens: the start of the README.
fn context_text() -> String {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    readme.chars().take(2400).collect()
}

/// Runs tests/browser/page.mjs with `plan`.
fn drive(browser: &Browser, mut plan: Value) -> Value {
    plan["question"] = QUESTION.into();
    let report = run_driver(browser, "page.mjs", plan);
    assert!(
        report.get("error").is_none(),
        "the page test failed: {report:#}"
    );
    report
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} missing: {v:#}"))
}

#[test]
fn chat_page_streams_an_answer_with_cloud_kv_and_keeps_the_model_cached() {
    let browser = Browser::find();
    // The cloud asks for a signed token: the page passes its `?token=` to every call (contexts, weights, KV).
    let key = tandem_tests::tokens::TestKey::new();
    let token = key.token("page", 3600);
    let mut cloud = TestCloud::start(ServeOptions {
        static_dir: Some(page_dir()),
        auth: key.auth(),
        ..Default::default()
    });
    cloud.token = Some(token.clone());
    cloud.register(&context_text());
    let artifacts = target_dir().join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("chat-page.png");
    let phone = artifacts.join("chat-page-phone.png");
    let _ = std::fs::remove_file(&screenshot);
    let _ = std::fs::remove_file(&phone);
    let r = drive(
        &browser,
        json!({ "url": format!("{}/?max_tokens=32&token={token}", cloud.url()), "screenshot": screenshot, "compare": true,
            "phoneScreenshot": phone, "reload": true }),
    );
    eprintln!("chat page: {:#}", r["panel"]);

    assert!(text(&r, "modelStatus").contains("downloaded"), "{r:#}");
    assert_eq!(r["sawStreaming"], true, "{r:#}");
    assert!(!text(&r, "answer").trim().is_empty(), "{r:#}");
    let panel = &r["panel"];
    assert!(
        text(panel, "source").starts_with("cloud, codec"),
        "{panel:#}"
    );
    let ttft: f64 = text(panel, "ttft").trim_end_matches(" ms").parse().unwrap();
    assert!(ttft > 0.0, "{panel:#}");
    assert!(
        !text(panel, "kv_bytes").starts_with("0 B") && text(panel, "kv_bytes").contains("f16"),
        "{panel:#}"
    );
    assert!(
        r["timelineBars"].as_u64().unwrap() >= 30,
        "a bar per layer: {r:#}"
    );
    assert!(text(panel, "backend").starts_with("wasm-cpu"), "{panel:#}");
    // The conversation is kept in the browser, and the model is not downloaded again.
    assert_eq!(r["history"], 1, "{r:#}");
    assert_eq!(r["historyAfterReload"], 1, "{r:#}");
    assert!(text(&r, "reloadedStatus").contains("cache"), "{r:#}");
    // The comparison with a local prefill of the same question is shown.
    let compare = text(&r, "compare");
    assert!(
        compare.starts_with("Local prefill: TTFT ") && compare.contains("with the cloud's KV"),
        "{compare}"
    );
    // At phone width, nothing runs off the side.
    assert_eq!(r["phoneOverflow"], false, "{r:#}");
    assert!(std::fs::metadata(&phone).is_ok_and(|m| m.len() > 10_000));
    assert!(
        std::fs::metadata(&screenshot)
            .map(|m| m.len() > 10_000)
            .unwrap_or(false),
        "screenshot saved"
    );
}

/// A cloud process killed as the question is sent: the page still answers, from a local prefill of the context,
/// and says that it fell back.
#[test]
fn chat_page_finishes_locally_when_the_cloud_dies() {
    let browser = Browser::find();
    let dir = page_dir();
    let context =
        std::env::temp_dir().join(format!("tandem-page-context-{}.md", std::process::id()));
    std::fs::write(&context, context_text()).unwrap();
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cloud = Command::new(target_dir().join("release/tandem"))
        .args(["serve", "--addr", &addr.to_string(), "--static-dir"])
        .arg(&dir)
        .arg("--context-file")
        .arg(&context)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tandem serve starts (build it first: `cargo build --release -p tandem-cloud`, as `just test` does)");
    let mut lines = BufReader::new(cloud.stdout.take().unwrap()).lines();
    let listening = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains("listening on"));
    assert!(listening, "the cloud did not start");

    let r = drive(
        &browser,
        json!({ "url": format!("http://{addr}/?max_tokens=24"), "codec": "lossless", "killPid": cloud.id() }),
    );
    let _ = cloud.wait();
    let _ = std::fs::remove_file(&context);
    eprintln!("after the kill: {:#} / {:?}", r["panel"], r["notice"]);
    assert!(!text(&r, "answer").trim().is_empty(), "{r:#}");
    assert!(
        text(&r["panel"], "source").starts_with("computed here"),
        "{r:#}"
    );
    assert!(
        text(&r, "notice").contains("computed here"),
        "the page says it fell back: {r:#}"
    );
}
