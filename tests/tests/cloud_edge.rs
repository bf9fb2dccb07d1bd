//! The cloud server and the native edge, end to end on 127.0.0.1 over a real WebSocket, with real weights.

use std::time::{Duration, Instant};

use tandem_cloud::ServeOptions;
use tandem_common::codec::Codec;
use tandem_common::engine::GenerateOptions;
use tandem_common::model::{LayerwisePrefill, Logits};
use tandem_common::quant::Precision;
use tandem_common::sample::argmax;
use tandem_common::tokenizer::Message;
use tandem_edge::chat::{CloudContext, ContextSource, KvSource, TurnStats, chat_turn};
use tandem_edge::fetch;
use tandem_edge::protocol::FetchRequest;
use tandem_tests::cloud::TestCloud;
use tandem_tests::faults::{self, Fault};
use tandem_tests::{capture, engine, http, raw_ws as raw};

const CONTEXT: &str = "tandem is a Rust system in which a small language model on the edge answers users privately and \
fast, because a cloud server hands it the KV cache of long shared context, computed once, compressed, and streamed \
layer by layer. The cloud runs a warp server; the edge runs in a browser tab or a wasmtime host. The project's \
mascot is a pelican named Tandy, and its favourite number is 42.";

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        ..Default::default()
    }
}

/// The answer to `q` with [`CONTEXT`] computed here: the reference every cloud path must match.
fn local_answer(q: &[Message], opts: &GenerateOptions) -> (Vec<u32>, TurnStats) {
    let local = ContextSource {
        cloud: None,
        text: Some(CONTEXT.into()),
    };
    chat_turn(engine("smollm2"), &local, q, opts, |_, _| {}).unwrap()
}

fn ask(text: &str) -> Vec<Message> {
    vec![Message::new("user", text)]
}

/// Lossless cloud KV gives exactly the tokens of a fully local run; an unreachable cloud or an unknown context falls
/// back to the same answer; the cloud-only OpenAI endpoint with the same context agrees too.
#[test]
fn lossless_cloud_kv_equals_local_and_fallbacks_agree() {
    let cloud = TestCloud::start(ServeOptions::default());
    let id = cloud.register(CONTEXT);
    let e = engine("smollm2");
    let q = ask("What is the mascot's name?");
    let opts = greedy(24);

    let (want, st) = local_answer(&q, &opts);
    assert!(matches!(st.source, KvSource::Local { .. }));
    assert!(want.len() > 3);

    let remote = ContextSource {
        cloud: Some(cloud.edge_context(&id, Some(Codec::Lossless))),
        text: None,
    };
    let mut streamed = String::new();
    let (got, st) = chat_turn(e, &remote, &q, &opts, |_, t| streamed.push_str(t)).unwrap();
    assert_eq!(st.source, KvSource::exact(Codec::Lossless));
    assert_eq!(got, want, "lossless cloud KV changed the answer");
    assert_eq!(
        st.context_tokens,
        e.tokenizer.context_tokens(CONTEXT).unwrap().len()
    );
    assert!(st.kv.kv_bytes > 0);
    eprintln!(
        "lossless: {} KV bytes, TTFT {:?}: {streamed:?}",
        st.kv.kv_bytes, st.ttft
    );

    // Unknown context on the cloud, text here: computed locally, same answer, and the reason says why.
    let unknown = ContextSource {
        cloud: Some(cloud.edge_context("00000000000000000000000000000000", None)),
        text: Some(CONTEXT.into()),
    };
    let (got, st) = chat_turn(e, &unknown, &q, &opts, |_, _| {}).unwrap();
    assert_eq!(got, want);
    let KvSource::Local { reason } = &st.source else {
        panic!("expected a local fallback, got {:?}", st.source)
    };
    assert!(reason.contains("UnknownContext"), "{reason}");

    // No cloud listening at all.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut gone = cloud.edge_context(&id, None);
    gone.cloud_url = dead;
    let (got, st) = chat_turn(
        e,
        &ContextSource {
            cloud: Some(gone.clone()),
            text: Some(CONTEXT.into()),
        },
        &q,
        &opts,
        |_, _| {},
    )
    .unwrap();
    assert_eq!(got, want);
    assert!(matches!(&st.source, KvSource::Local { reason } if reason.contains("cannot reach")));
    let err = chat_turn(
        e,
        &ContextSource {
            cloud: Some(gone),
            text: None,
        },
        &q,
        &opts,
        |_, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("no local copy"), "{err}");

    // The OpenAI-style endpoint, spoken as plain HTTP, cloud-only with the same context.
    let body = serde_json::json!({
        "model": "smollm2", "messages": [{"role": "user", "content": "What is the mascot's name?"}],
        "max_tokens": 24, "temperature": 0, "context": id,
    });
    let (status, reply) = http::request(
        cloud.addr,
        "POST",
        "/v1/chat/completions",
        &body.to_string(),
    );
    assert_eq!(status, 200, "{reply}");
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    let shown: Vec<u32> = want
        .iter()
        .copied()
        .filter(|&t| !e.tokenizer.is_stop(t))
        .collect();
    assert_eq!(text, e.tokenizer.decode(&shown).unwrap());
    assert_eq!(v["usage"]["completion_tokens"], want.len());

    let mut streaming = body.clone();
    streaming["stream"] = true.into();
    let (status, sse) = http::request(
        cloud.addr,
        "POST",
        "/v1/chat/completions",
        &streaming.to_string(),
    );
    assert_eq!(status, 200);
    let mut deltas = String::new();
    let mut done = false;
    for data in sse.lines().filter_map(|l| l.strip_prefix("data:")) {
        if data.trim() == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        if let Some(t) = chunk["choices"][0]["delta"]["content"].as_str() {
            deltas.push_str(t);
        }
    }
    assert!(done, "stream ends with [DONE]: {sse}");
    assert_eq!(deltas, text);

    // OpenAI's `stream_options.include_usage`, and llama.cpp's `ignore_eos`: exactly max_tokens tokens, counted.
    streaming["stream_options"] = serde_json::json!({ "include_usage": true });
    streaming["ignore_eos"] = true.into();
    streaming["max_tokens"] = (want.len() + 8).into();
    let (_, sse) = http::request(
        cloud.addr,
        "POST",
        "/v1/chat/completions",
        &streaming.to_string(),
    );
    let usage: Vec<serde_json::Value> = sse
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.strip_prefix("data:")?).ok())
        .filter(|c| !c["usage"].is_null())
        .collect();
    assert_eq!(usage.len(), 1, "one usage chunk: {sse}");
    assert_eq!(usage[0]["usage"]["completion_tokens"], want.len() + 8);
    assert_eq!(usage[0]["choices"], serde_json::json!([]));

    let (status, reply) = http::request(
        cloud.addr,
        "POST",
        "/v1/chat/completions",
        "{\"messages\": 3}",
    );
    assert_eq!(status, 400);
    assert!(reply.contains("messages"), "{reply}");
}

/// Over a link the edge reports as slow, the cloud leaves the lowest layers to the edge, which computes them (a layer
/// at a time, giving the very KV of an ordinary prefill) while the others stream: with the lossless codec the answer
/// is exactly a local run's, and the split shows in the turn's stats and the cloud's metrics. Over a fast link every
/// layer streams.
#[test]
fn a_slow_link_leaves_the_lowest_layers_to_the_edge() {
    let e = engine("smollm2");
    let n = e.model.config().n_layers;
    // Three prefill chunks: the layer-at-a-time prefill equals the chunk-at-a-time one, bit for bit.
    let long = e.tokenizer.context_tokens(&[CONTEXT; 3].join(" ")).unwrap();
    assert!(long.len() > 2 * 128, "{} tokens", long.len());
    let exact = e.prefill_kv(&long).unwrap();
    let mut layerwise = LayerwisePrefill::new(&e.model, &long, 0).unwrap();
    for l in 0..n {
        assert!(
            layerwise.next_layer().unwrap() == exact.layers[l],
            "layer {l} differs"
        );
    }
    assert!(layerwise.next_layer().is_none());
    // That prefill measured this machine's speed, which the edge now reports.
    assert!(e.prefill_tokens_per_s().is_some());

    let cloud = TestCloud::start(ServeOptions::default());
    let id = cloud.register(CONTEXT);
    let q = ask("What is the mascot's name?");
    let opts = greedy(24);
    let (want, _) = local_answer(&q, &opts);

    let mut slow = cloud.edge_context(&id, Some(Codec::Lossless));
    slow.bandwidth_bps = Some(100_000);
    let remote = |c: CloudContext| ContextSource {
        cloud: Some(c),
        text: None,
    };
    let (got, st) = chat_turn(e, &remote(slow), &q, &opts, |_, _| {}).unwrap();
    assert_eq!(st.source, KvSource::exact(Codec::Lossless));
    let local_layers = st.kv.local_layers;
    assert!(
        local_layers > n / 2 && local_layers < n,
        "a 100 kb/s link should leave most but not all of {n} layers to the edge, left {local_layers}"
    );
    assert_eq!(st.kv.layers, n - local_layers);
    assert_eq!(st.summary().kv_local_layers as usize, local_layers);
    assert_eq!(got, want, "the split changed the answer");
    assert_eq!(
        cloud.metric("tandem_kv_layers_left_to_edges_total"),
        local_layers as u64
    );

    let mut fast = cloud.edge_context(&id, Some(Codec::Lossless));
    fast.bandwidth_bps = Some(100_000_000_000);
    let (got, st) = chat_turn(e, &remote(fast), &q, &opts, |_, _| {}).unwrap();
    assert_eq!((st.kv.local_layers, st.kv.layers), (0, n));
    assert_eq!(got, want);
}

/// A KV stream that breaks mid-way — cut, or a chunk corrupted in flight — resumes from the layer it broke at on a
/// new connection: the answer still comes from the cloud's KV and equals a local run's.
#[test]
fn a_broken_stream_resumes_from_the_layer_it_broke_at() {
    let cloud = TestCloud::start(ServeOptions::default());
    let id = cloud.register(CONTEXT);
    let e = engine("smollm2");
    let n = e.model.config().n_layers;
    let q = ask("What is the mascot's name?");
    let opts = greedy(24);
    let (want, _) = local_answer(&q, &opts);
    // Lossless layers of this context are ~130 kB each: 300 kB in is a few layers into the stream.
    for fault in [
        Fault::Cut { after: 300_000 },
        Fault::Corrupt { at: 300_000 },
    ] {
        let relay = faults::relay(cloud.addr, fault);
        let mut c = cloud.edge_context(&id, Some(Codec::Lossless));
        c.cloud_url = format!("http://{relay}");
        let remote = ContextSource {
            cloud: Some(c),
            text: None,
        };
        let (got, st) = chat_turn(e, &remote, &q, &opts, |_, _| {}).unwrap();
        assert_eq!(st.source, KvSource::exact(Codec::Lossless), "{fault:?}");
        assert_eq!(st.kv.resumes, 1, "{fault:?}");
        assert_eq!(st.kv.layers + st.kv.local_layers, n, "{fault:?}");
        assert_eq!(got, want, "{fault:?}");
    }
}

/// Top-1 agreement of a session on cloud KV in `codec` with one on exact KV, teacher-forced along the exact run's
/// greedy tokens (128 per question), and the KV bytes the context took.
fn agreement(
    cloud: &TestCloud,
    (id, context): (&str, &str),
    questions: &[&str],
    precision: Precision,
    codecs: &[Codec],
) -> Vec<(f64, usize)> {
    let e = engine("smollm2");
    let exact = e
        .prefill_kv(&e.tokenizer.context_tokens(context).unwrap())
        .unwrap();
    let steps = 128;
    let mut references = Vec::new();
    for q in questions {
        let prompt = e.tokenizer.chat_tokens(&ask(q), true).unwrap();
        let mut s = e.session();
        s.set_precision(precision);
        s.attach_context(&exact).unwrap();
        let mut logits = s.prefill(&prompt).unwrap();
        let mut ids = Vec::new();
        for _ in 0..steps {
            let t = argmax(&logits);
            ids.push(t);
            logits = s.decode(t).unwrap();
        }
        references.push((prompt, ids));
    }
    let mut rates = Vec::new();
    for &codec in codecs {
        let (mut agree, mut total, mut bytes) = (0, 0, 0);
        for (prompt, ids) in &references {
            let t0 = Instant::now();
            let mut f = fetch::start(
                fetch_request(cloud, id, Some(codec), Codec::ALL.to_vec()),
                t0,
            )
            .unwrap();
            let header = f.header.clone();
            let mut s = e.session();
            s.set_precision(precision);
            let mut logits = s
                .prefill_streamed(&header, prompt, &mut |l| f.layer(l, t0).map(Into::into))
                .and_then(Logits::read)
                .unwrap();
            bytes = f.stats.kv_bytes;
            for &t in ids {
                agree += usize::from(argmax(&logits) == t);
                total += 1;
                logits = s.decode(t).unwrap();
            }
        }
        let rate = agree as f64 / total as f64;
        eprintln!(
            "{precision:?} mat-muls, {codec}: top-1 agreement {agree}/{total} = {:.2}%, {bytes} KV bytes for {} context tokens",
            rate * 100.0,
            exact.len()
        );
        rates.push((rate, bytes));
    }
    rates
}

fn fetch_request(
    cloud: &TestCloud,
    id: &str,
    codec: Option<Codec>,
    codecs: Vec<Codec>,
) -> FetchRequest {
    FetchRequest {
        codecs,
        ..cloud
            .edge_context(id, codec)
            .fetch_request(engine("smollm2"))
    }
}

/// How faithful the codecs are. With f32 mat-muls the comparison isolates the codec: 8-bit must keep ≥ 99% of the
/// tokens. On the fast path (8-bit activations) a perturbation anywhere flips activation roundings, and SmolLM2's
/// flat distributions turn those into top-1 flips at near-ties: there even f16 KV loses ~1% (measured), so those
/// rates are reported, and only lossless must be exact.
#[test]
fn quantized_codecs_agree_with_exact_kv() {
    let cloud = TestCloud::start(ServeOptions::default());
    let id = cloud.register(CONTEXT);
    let questions = [
        "What is the mascot's name?",
        "Where does the edge run?",
        "Explain what the cloud computes once.",
        "Write a short poem about layers.",
    ];
    let fast = agreement(
        &cloud,
        (&id, CONTEXT),
        &questions,
        Precision::Q8,
        &[Codec::Lossless, Codec::Q8, Codec::Q4],
    );
    assert_eq!(fast[0].0, 1.0, "lossless KV changed a token");
    let exact = agreement(
        &cloud,
        (&id, CONTEXT),
        &questions,
        Precision::F32,
        &[Codec::Q8, Codec::Q4],
    );
    assert!(
        exact[0].0 >= 0.99,
        "8-bit KV agreement {} below 99%",
        exact[0].0
    );
}

/// Transform coding against fixed-width groups, on a long context (an early version of this project's README,
/// frozen so the README can change), where a head's basis is paid for by 2,000 tokens: pca8 as faithful as q8 in
/// under 0.7 of its bytes, pca4 about as faithful as q4 and pca2 at least as faithful as q2, each in fewer bytes.
#[test]
fn transform_codecs_beat_fixed_width_groups_on_long_contexts() {
    let cloud = TestCloud::start(ServeOptions::default());
    // About 2,000 tokens.
    let text = include_str!("../fixtures/long_context.md");
    let id = cloud.register(text);
    let questions = [
        "Summarise the context in two sentences.",
        "Which command runs the tests?",
    ];
    let rates = agreement(
        &cloud,
        (&id, text),
        &questions,
        Precision::F32,
        // Every codec below f16, in `Codec::ALL`'s order.
        &Codec::ALL[2..],
    );
    let [q8, pca8, q4, pca4, pca3, pca2, q2] = rates[..] else {
        unreachable!()
    };
    assert!(
        pca8.1 * 10 < q8.1 * 7 && pca8.0 >= q8.0 - 0.01,
        "pca8 {pca8:?} vs q8 {q8:?}"
    );
    assert!(
        pca4.1 < q4.1 && pca4.0 >= q4.0 - 0.02,
        "pca4 {pca4:?} vs q4 {q4:?}"
    );
    assert!(
        pca2.1 < q2.1 && pca2.0 >= q2.0,
        "pca2 {pca2:?} vs q2 {q2:?}"
    );
    assert!(
        pca2.1 < pca3.1 && pca3.1 < pca4.1,
        "pca3 {pca3:?} between pca4 {pca4:?} and pca2 {pca2:?}"
    );
}

/// Garbage, truncation, wrong version or weights, oversized frames, unknown contexts and abrupt disconnects each
/// get a clear Error frame or a clean close; the server keeps serving and leaks no session.
#[test]
fn bad_input_over_the_socket_is_refused_clearly() {
    use tandem_common::wire::{self, ErrorCode, Frame, MAX_FRAME_BYTES, PROTOCOL_VERSION};
    let cloud = TestCloud::start(ServeOptions::default());
    let id = cloud.register(CONTEXT);
    let e = engine("smollm2");
    let hello = |version: u16, weights: &str| Frame::Hello {
        version,
        auth: None,
        model: "smollm2".into(),
        weights: weights.into(),
        codecs: vec![Codec::Q8],
        bandwidth_bps: None,
    };
    let good = wire::encode(&hello(PROTOCOL_VERSION, e.model.fingerprint()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let refused = |f: Option<Frame>, want: ErrorCode, words: &str| match f {
            Some(Frame::Error { code, message }) => {
                assert_eq!(code, want, "{message}");
                assert!(
                    message.contains(words),
                    "{message:?} should mention {words:?}"
                );
            }
            other => panic!("expected Error {want:?}, got {other:?}"),
        };
        let cases: Vec<(Vec<u8>, ErrorCode, &str)> = vec![
            (
                b"not a frame at all".to_vec(),
                ErrorCode::BadFrame,
                "checksum",
            ),
            (
                good[..good.len() - 3].to_vec(),
                ErrorCode::BadFrame,
                "checksum",
            ),
            (vec![1, 2], ErrorCode::BadFrame, "too short"),
            (
                wire::encode(&hello(99, e.model.fingerprint())),
                ErrorCode::UnsupportedVersion,
                "99",
            ),
            (
                wire::encode(&hello(PROTOCOL_VERSION, "bogus")),
                ErrorCode::WrongModel,
                "bogus",
            ),
            (
                wire::encode(&Frame::Done {
                    context: id.clone(),
                    bytes: 0,
                }),
                ErrorCode::BadFrame,
                "expected Hello",
            ),
        ];
        for (bytes, code, words) in cases {
            let mut ws = raw::connect(cloud.addr).await;
            raw::send(&mut ws, bytes).await;
            refused(raw::next(&mut ws).await, code, words);
            assert!(raw::next(&mut ws).await.is_none(), "closed after the error");
        }

        // Oversized: the server drops the connection rather than buffer it.
        let mut ws = raw::connect(cloud.addr).await;
        raw::send(&mut ws, vec![0; MAX_FRAME_BYTES + 1]).await;
        assert!(raw::next(&mut ws).await.is_none());

        // Unknown context, then a bad layer range: errors, the session goes on; then a real request, dropped mid-stream.
        let mut ws = raw::connect(cloud.addr).await;
        raw::send(&mut ws, good.clone()).await;
        assert!(matches!(
            raw::next(&mut ws).await,
            Some(Frame::Welcome { .. })
        ));
        let request = |context: &str, layers: (u32, u32)| {
            wire::encode(&Frame::Request {
                context: context.into(),
                layers,
                tokens: None,
                codec: None,
                edge_prefill_tps: None,
                mode: Default::default(),
            })
        };
        raw::send(&mut ws, request("ffff", (0, 30))).await;
        refused(raw::next(&mut ws).await, ErrorCode::UnknownContext, "ffff");
        raw::send(&mut ws, request(&id, (0, 31))).await;
        refused(raw::next(&mut ws).await, ErrorCode::BadRequest, "0..30");
        raw::send(&mut ws, request(&id, (0, 30))).await;
        assert!(matches!(
            raw::next(&mut ws).await,
            Some(Frame::Context {
                codec: Codec::Q8,
                ..
            })
        ));
        assert!(matches!(
            raw::next(&mut ws).await,
            Some(Frame::LayerChunk { layer: 0, .. })
        ));
        drop(ws);
    });

    // Another client is served normally meanwhile, and no session is left behind.
    let t0 = Instant::now();
    let mut f = fetch::start(fetch_request(&cloud, &id, None, vec![Codec::Q4]), t0).unwrap();
    assert_eq!(f.codec, Codec::Q4, "the only codec the edge offers");
    for l in 0..e.model.config().n_layers {
        f.layer(l, t0).unwrap();
    }
    drop(f);
    let deadline = Instant::now() + Duration::from_secs(10);
    while cloud.metric("tandem_kv_sessions_active") > 0 {
        assert!(Instant::now() < deadline, "KV sessions leaked");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(cloud.metric("tandem_kv_errors_total") >= 8);
}

/// Privacy: every byte the edge sends the cloud during a chat, unmasked, holds the context id and none of the user's
/// text or token ids.
#[test]
fn user_messages_never_leave_the_edge() {
    let cloud = TestCloud::start(ServeOptions::default());
    let id = cloud.register(CONTEXT);
    let relay = capture::relay(cloud.addr);
    let e = engine("smollm2");
    let secret = "My bank password is hunter2, please remember Zanzibar";
    let mut via = cloud.edge_context(&id, None);
    via.cloud_url = format!("http://{}", relay.addr);
    let (_, st) = chat_turn(
        e,
        &ContextSource {
            cloud: Some(via),
            text: None,
        },
        &ask(secret),
        &greedy(8),
        |_, _| {},
    )
    .unwrap();
    assert!(matches!(st.source, KvSource::Cloud { .. }));

    let streams = relay.sent.lock().unwrap().clone();
    assert_eq!(streams.len(), 1, "one connection to the cloud");
    let sent = capture::unmask(&streams[0]);
    assert!(
        capture::contains(&sent, id.as_bytes()),
        "the capture holds the protocol (context id)"
    );
    assert!(capture::contains(&sent, e.model.fingerprint().as_bytes()));
    capture::assert_holds_no_user_data(&sent, secret, e);
}
