//! The large → small KV modes over the real protocol: a cloud serving an alignment streams projected KV, and edges
//! ask for it per request (`split:K`, `fused`) and report it in their stats. The alignment is SmolLM2 fitted to
//! itself (the real 1.5B → 0.5B fit is `just align`): its projection is nearly the identity, so every mode must
//! answer (nearly) as the model reading its own context does — an answer that cannot come out right by accident.

use std::time::Duration;

use tandem_cloud::ServeOptions;
use tandem_cloud::align::calibration::Manifest;
use tandem_cloud::align::{FitOptions, fit};
use tandem_common::codec::Codec;
use tandem_common::engine::GenerateOptions;
use tandem_common::tokenizer::Message;
use tandem_common::wire::KvMode;
use tandem_edge::chat::{CloudContext, ContextSource, KvSource, TurnStats, chat_turn};
use tandem_tests::cloud::TestCloud;
use tandem_tests::{answers, engine};

const QUESTION: &str = "What does the cloud hand the edge, in one sentence?";

/// The first part of this project's README: a real shared context of a few hundred tokens.
fn context_text() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README");
    readme.chars().take(1500).collect()
}

fn ask(cloud: &TestCloud, id: &str, mode: KvMode) -> (Vec<u32>, TurnStats) {
    let source = ContextSource {
        cloud: Some(CloudContext {
            mode,
            codec: Some(Codec::Lossless),
            timeout: Duration::from_secs(60),
            ..answers::cloud_context(&cloud.url(), id, None)
        }),
        text: Some(context_text()),
    };
    let opts = GenerateOptions {
        max_tokens: 24,
        ..Default::default()
    };
    chat_turn(
        engine("smollm2"),
        &source,
        &[Message::new("user", QUESTION)],
        &opts,
        |_, _| {},
    )
    .unwrap_or_else(|e| panic!("{mode} turn: {e}"))
}

/// Share of positions where two answers pick the same token.
fn agreement(a: &[u32], b: &[u32]) -> f64 {
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    same as f64 / a.len().max(b.len()).max(1) as f64
}

#[test]
fn projected_modes_stream_over_the_protocol_and_are_reported() {
    let e = engine("smollm2");
    let n = e.model.config().n_layers;
    let dir = std::env::temp_dir().join(format!("tandem-projected-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let opts = FitOptions {
        calibration_chunks: 3,
        held_out_chunks: 1,
        chunk_tokens: 320,
        gate_chunks: 1,
        gate_tokens: 12,
        gate_bands: 2,
    };
    let mut alignment = fit(e, e, &Manifest::discover().unwrap(), opts, &mut |m| {
        eprintln!("{m}")
    })
    .unwrap()
    .alignment;
    // Gates set by hand (a self-alignment's fit has nothing to gain): the lowest 5 layers read only their own KV.
    alignment.gates = (0..n).map(|l| if l < 5 { 0.0 } else { 0.5 }).collect();
    let path = dir.join("alignment.bin");
    std::fs::write(&path, alignment.to_bytes()).unwrap();
    let alignment_id = alignment.id();

    let cloud = TestCloud::start(ServeOptions {
        models: vec!["smollm2".into()],
        alignments: vec![path.clone()],
        ..Default::default()
    });
    let id = cloud.register(&context_text());
    let (exact, st) = ask(&cloud, &id, KvMode::Exact);
    assert_eq!(st.source, KvSource::exact(Codec::Lossless));
    assert_eq!(st.summary().kv_mode.as_deref(), Some("exact"));
    let exact_bytes = st.kv.kv_bytes;

    // Split: the edge computes its lowest 10 layers; the others are the projected KV.
    let split = KvMode::Split { own_layers: 10 };
    let (answer, st) = ask(&cloud, &id, split);
    let want = KvSource::Cloud {
        codec: Codec::Lossless,
        mode: split,
        alignment: Some(alignment_id.clone()),
    };
    assert_eq!(st.source, want, "{:?}", st.source);
    assert_eq!((st.kv.local_layers, st.kv.layers), (10, n - 10));
    assert!(st.kv.kv_bytes < exact_bytes * (n - 9) / n);
    let summary = st.summary();
    assert_eq!(
        (summary.kv_mode.as_deref(), summary.alignment.as_deref()),
        (Some("split:10"), Some(alignment_id.as_str()))
    );
    let a = agreement(&answer, &exact);
    eprintln!(
        "split:10 agrees with the exact answer on {:.0}% of tokens",
        100.0 * a
    );
    assert!(a >= 0.75, "split answer {answer:?} vs exact {exact:?}");

    // Fused: every layer computed here, the projected KV blended in where the gate is above 0 (only those stream).
    let (answer, st) = ask(&cloud, &id, KvMode::Fused);
    assert_eq!(
        st.source,
        KvSource::Cloud {
            codec: Codec::Lossless,
            mode: KvMode::Fused,
            alignment: Some(alignment_id.clone()),
        }
    );
    assert_eq!((st.kv.local_layers, st.kv.layers), (n, n - 5));
    let a = agreement(&answer, &exact);
    eprintln!(
        "fused agrees with the exact answer on {:.0}% of tokens",
        100.0 * a
    );
    assert!(a >= 0.75, "fused answer {answer:?} vs exact {exact:?}");

    // The LLM prefilled and the alignment projected the context once, for both modes.
    assert_eq!(cloud.metric("tandem_contexts_projected_total"), 1);
    // The projected copy is the cloud's own business, not a context to list.
    let (_, list) = cloud.request("GET", "/v1/contexts", "");
    assert!(
        list.contains(&id) && !list.contains(&alignment_id),
        "{list}"
    );

    // A split that leaves nothing to stream is refused, by name; the edge computes the context itself.
    let (answer, st) = ask(
        &cloud,
        &id,
        KvMode::Split {
            own_layers: n as u32,
        },
    );
    let KvSource::Local { reason } = &st.source else {
        panic!("expected a local fallback, got {:?}", st.source)
    };
    assert!(reason.contains("between 1 and"), "{reason}");
    assert_eq!(answer, exact, "the fallback computes the exact context");

    // A cloud without an alignment says so; the edge falls back to its own reading.
    let plain = TestCloud::start(ServeOptions {
        models: vec!["smollm2".into()],
        ..Default::default()
    });
    let id = plain.register(&context_text());
    let (answer, st) = ask(&plain, &id, KvMode::Fused);
    let KvSource::Local { reason } = &st.source else {
        panic!("expected a local fallback, got {:?}", st.source)
    };
    assert!(reason.contains("alignment"), "{reason}");
    assert_eq!(answer, exact);

    // A server refuses to start with an alignment whose models it does not serve.
    let err = tandem_cloud::load_app(&ServeOptions {
        models: vec!["qwen-0.5b".into()],
        alignments: vec![path],
        ..Default::default()
    })
    .err()
    .expect("refused");
    assert!(format!("{err:#}").contains("--model"), "{err:#}");
    let _ = std::fs::remove_dir_all(&dir);
}
