//! The edge runtime as a WebAssembly component under wasmtime (`tandem-gateway`), and the gateway as a KV cache for
//! nearby edges: real component, real cloud, real WebSockets on loopback.

use std::sync::OnceLock;
use std::time::Duration;

use tandem_cloud::ServeOptions;
use tandem_cloud::upstream::Upstream;
use tandem_common::engine::GenerateOptions;
use tandem_common::tokenizer::Message;
use tandem_edge::chat::{CloudContext, ContextSource, KvSource, chat_turn};
use tandem_gateway::host::{self, Runtime, Weights};
use tandem_tests::cloud::TestCloud;
use tandem_tests::parity::{assert_same_answer, native_steps};
use tandem_tests::{capture, engine};

const CONTEXT: &str = "The gateway on the third floor of the Lisbon office is a small ARM box called Gull. It caches \
the shared context for the sensors and tablets near it. Its administrator is Ana, and its backup runs at 03:00.";
const QUESTION: &str = "What does Gull cache?";
const TOKENS: u32 = 16;

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        let path = tandem_gateway::default_component(&tandem_tests::target_dir());
        assert!(
            path.exists(),
            "{} is missing: build the component first (`just component`)",
            path.display()
        );
        Runtime::load(&path).unwrap_or_else(|e| panic!("component loads: {e:#}"))
    })
}

fn greedy() -> host::GenerateOptions {
    host::GenerateOptions {
        max_tokens: TOKENS,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    }
}

fn wit_cloud(url: &str, id: &str) -> host::CloudContext {
    host::CloudContext {
        url: url.into(),
        model: "smollm2".into(),
        context: id.into(),
        codec: Some("lossless".into()),
        kv_mode: None,
        bandwidth_bps: None,
        auth: None,
        timeout_ms: 30_000,
    }
}

/// The component's answer, piece by piece, and its stats.
fn component_answer(context: host::ContextSource) -> (Vec<String>, host::TurnStats) {
    component_answer_to("smollm2", QUESTION, context)
}

/// `model`'s answer to `question` in the component, piece by piece, and its stats.
fn component_answer_to(
    model: &str,
    question: &str,
    context: host::ContextSource,
) -> (Vec<String>, host::TurnStats) {
    let mut edge = runtime()
        .instance(model, Weights::Cache)
        .unwrap_or_else(|e| panic!("instance: {e:#}"));
    let mut pieces = Vec::new();
    let question = [host::Message {
        role: "user".into(),
        content: question.into(),
    }];
    let stats = edge
        .chat(&question, &context, greedy(), |t| {
            pieces.push(t.to_string())
        })
        .unwrap_or_else(|e| panic!("chat: {e:#}"));
    (pieces, stats)
}

/// The native edge's answer through `cloud_url`, piece by piece, and where its KV came from.
fn native_answer(cloud_url: &str, id: &str) -> (Vec<String>, KvSource) {
    let context = ContextSource {
        cloud: Some(CloudContext {
            cloud_url: cloud_url.into(),
            model: "smollm2".into(),
            context: id.into(),
            codec: Some(tandem_common::codec::Codec::Lossless),
            mode: Default::default(),
            bandwidth_bps: None,
            auth: None,
            timeout: Duration::from_secs(30),
        }),
        text: None,
    };
    let opts = GenerateOptions {
        max_tokens: TOKENS as usize,
        ..Default::default()
    };
    let mut pieces = Vec::new();
    let (_, st) = chat_turn(
        engine("smollm2"),
        &context,
        &[Message::new("user", QUESTION)],
        &opts,
        |_, t| pieces.push(t.to_string()),
    )
    .expect("native turn");
    (pieces, st.source)
}

/// The component streams the context's KV through its host's link and answers as the native edge does; a second
/// edge asking the gateway for the same context causes no second transfer from the cloud.
#[test]
fn component_answers_like_native_and_the_gateway_caches_context_kv() {
    let cloud = TestCloud::start(ServeOptions::default());
    let id = cloud.register(CONTEXT);
    let native = native_steps("smollm2", CONTEXT, QUESTION, TOKENS as usize);
    let (want, source) = native_answer(&cloud.url(), &id);
    assert!(matches!(source, KvSource::Cloud { .. }), "{source:?}");
    let pieces: Vec<&String> = native.iter().map(|(t, _)| t).collect();
    assert_eq!(
        want.iter().collect::<Vec<_>>(),
        pieces,
        "lossless cloud KV is local"
    );

    let (got, st) = component_answer(host::ContextSource {
        cloud: Some(wit_cloud(&cloud.url(), &id)),
        text: None,
    });
    assert_eq!(st.kv_source, "cloud", "{:?}", st.fallback_reason);
    assert_eq!(st.codec.as_deref(), Some("lossless"));
    assert!(st.kv_bytes > 0 && st.context_tokens > 40, "{st:?}");
    assert_same_answer(&got, &native, "component");
    assert_eq!(cloud.metric("tandem_kv_sessions_total"), 2);

    // A gateway in front of the cloud: the first edge's request pulls the context once, the second is served from
    // the gateway's store.
    let gateway = TestCloud::start(ServeOptions {
        upstream: Some(Upstream {
            url: cloud.url(),
            auth: None,
            timeout: Duration::from_secs(30),
        }),
        ..Default::default()
    });
    let (first, _) = native_answer(&gateway.url(), &id);
    let (second, st) = component_answer(host::ContextSource {
        cloud: Some(wit_cloud(&gateway.url(), &id)),
        text: None,
    });
    assert_eq!(st.kv_source, "cloud", "{:?}", st.fallback_reason);
    assert_eq!(first, want, "native through the gateway");
    assert_same_answer(&second, &native, "component via the gateway");
    assert_eq!(gateway.metric("tandem_kv_sessions_total"), 2);
    assert_eq!(gateway.metric("tandem_upstream_pulls_total"), 1);
    assert_eq!(
        cloud.metric("tandem_kv_sessions_total"),
        3,
        "one transfer to the gateway for both edges"
    );

    // A context neither holds is refused, not invented.
    let (_, st) = component_answer(host::ContextSource {
        cloud: Some(wit_cloud(
            &gateway.url(),
            "00000000000000000000000000000000",
        )),
        text: Some(CONTEXT.into()),
    });
    assert_eq!(st.kv_source, "local");
    assert!(
        st.fallback_reason
            .as_deref()
            .unwrap_or("")
            .contains("no context"),
        "{st:?}"
    );
}

/// With the cloud unreachable, the component prefills the context itself and gives the same answer.
#[test]
fn component_falls_back_to_local_prefill_when_the_cloud_is_unreachable() {
    let cloud = TestCloud::start(ServeOptions::default());
    let id = cloud.register(CONTEXT);
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (got, st) = component_answer(host::ContextSource {
        cloud: Some(wit_cloud(&format!("http://{dead}"), &id)),
        text: Some(CONTEXT.into()),
    });
    assert_eq!(st.kv_source, "local");
    let reason = st.fallback_reason.unwrap_or_default();
    assert!(reason.contains("cannot reach"), "{reason}");
    assert_same_answer(
        &got,
        &native_steps("smollm2", CONTEXT, QUESTION, TOKENS as usize),
        "component, local fallback",
    );
}

/// Qwen2.5-0.5B in the component answers as natively: its Q5_0 weights are widened to Q8_0 when a wasm CPU
/// engine loads them (`quant::repack`), and its Q4_K/Q6_K/Q8_0 ones run the simd128 kernels.
#[test]
fn component_runs_qwen_like_native() {
    let (got, st) = component_answer_to(
        "qwen-0.5b",
        QUESTION,
        host::ContextSource {
            cloud: None,
            text: Some(CONTEXT.into()),
        },
    );
    assert_eq!(st.kv_source, "local");
    assert_same_answer(
        &got,
        &native_steps("qwen-0.5b", CONTEXT, QUESTION, TOKENS as usize),
        "qwen-0.5b component",
    );
}

/// Weights that are not the pinned file are refused by the component with a message naming the model and hash.
#[test]
fn component_refuses_weights_with_the_wrong_hash() {
    let mut bytes = std::fs::read(tandem_common::models::resolve("smollm2").unwrap()).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    let dir = std::env::temp_dir().join(format!("tandem-wrong-weights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("smollm2.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let err = runtime()
        .instance("smollm2", Weights::File(path))
        .err()
        .expect("corrupt weights must be refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("smollm2") && msg.contains("sha256"), "{msg}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Privacy on the gateway path: every byte the component's host sends the cloud during a chat (recorded by a relay,
/// WebSocket frames unmasked) holds the context id and none of the user's text or token ids.
#[test]
fn component_sends_no_user_data_to_the_cloud() {
    let cloud = TestCloud::start(ServeOptions::default());
    let id = cloud.register(CONTEXT);
    let relay = capture::relay(cloud.addr);
    let secret = "My bank password is hunter2, please remember Zanzibar";
    let (_, st) = component_answer_to(
        "smollm2",
        secret,
        host::ContextSource {
            cloud: Some(wit_cloud(&format!("http://{}", relay.addr), &id)),
            text: None,
        },
    );
    assert_eq!(st.kv_source, "cloud", "{:?}", st.fallback_reason);
    let streams = relay.sent.lock().unwrap().clone();
    assert_eq!(streams.len(), 1, "one connection to the cloud");
    let sent = capture::unmask(&streams[0]);
    assert!(
        capture::contains(&sent, id.as_bytes()),
        "the capture holds the protocol"
    );
    capture::assert_holds_no_user_data(&sent, secret, engine("smollm2"));
}
