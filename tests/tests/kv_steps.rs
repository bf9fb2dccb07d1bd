//! Calibrated per-layer steps for the `pca` codecs: measured on real weights, written beside them, picked up by a
//! server that loads those weights, decoded by an unchanged edge; a profile that does not fit is refused by name.

use tandem_cloud::ServeOptions;
use tandem_cloud::kv_steps::{calibrate, path_for};
use tandem_common::codec::Codec;
use tandem_common::engine::GenerateOptions;
use tandem_common::models;
use tandem_common::quant::Precision;
use tandem_common::tokenizer::Message;
use tandem_edge::chat::{ContextSource, chat_turn};
use tandem_tests::cloud::TestCloud;
use tandem_tests::engine;

/// About 700 tokens of this project's architecture notes.
fn context() -> &'static str {
    let text = include_str!("../../ARCHITECTURE.md");
    &text[..text.floor_char_boundary(3000)]
}

fn pca2_bytes(cloud: &TestCloud, id: &str) -> u64 {
    let (status, body) = cloud.request("GET", &format!("/v1/contexts/{id}"), "");
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let sizes = info["sizes"].as_array().expect("sizes");
    (sizes.iter())
        .find(|s| s[0] == "Pca2" || s[0] == "pca2")
        .and_then(|s| s[1].as_u64())
        .unwrap_or_else(|| panic!("no pca2 size in {info}"))
}

#[test]
fn calibrated_steps_are_measured_saved_and_served() {
    let e = engine("smollm2");
    let layers = e.model.config().n_layers;
    let tokens = e.tokenizer.context_tokens(context()).unwrap();
    let question = ["What does the cloud compute?"];
    let profile = calibrate(e, &tokens, &question, 4, Precision::Q8, &mut |_, _| {}).unwrap();
    let sens = (profile.key_sensitivity.iter()).chain(&profile.value_sensitivity);
    assert_eq!(profile.scales.keys.len(), layers);
    assert_eq!(profile.scales.values.len(), layers);
    assert!(sens.clone().all(|s| s.is_finite() && *s >= 0.0));
    assert!(sens.clone().any(|&s| s > 0.0), "no layer moved anything");
    // Steps shrink where coding did more damage: the most sensitive tensor gets the finest step.
    let all = |v: &[f64], s: &[f32]| v.iter().copied().zip(s.iter().copied()).collect::<Vec<_>>();
    let mut pairs = all(&profile.key_sensitivity, &profile.scales.keys);
    pairs.extend(all(&profile.value_sensitivity, &profile.scales.values));
    let worst = pairs.iter().max_by(|a, b| a.0.total_cmp(&b.0)).unwrap();
    assert!(pairs.iter().all(|p| p.1 >= worst.1), "{pairs:?}");

    // SmolLM2's weights under a name of this test's, so the profile beside them touches no other test's model.
    let dir = std::env::temp_dir().join(format!("tandem-kv-steps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let weights = dir.join("smollm2.gguf");
    let _ = std::fs::remove_file(&weights);
    std::os::unix::fs::symlink(models::resolve("smollm2").unwrap(), &weights).unwrap();
    profile.save(&path_for(&weights)).unwrap();

    let serve = |model: &str| {
        TestCloud::start(ServeOptions {
            models: vec![model.into()],
            ..Default::default()
        })
    };
    let calibrated = serve(weights.to_str().unwrap());
    assert_eq!(
        calibrated.app.models[0].step_scales.as_ref(),
        Some(&profile.scales)
    );
    let uniform = serve("smollm2");
    assert!(uniform.app.models[0].step_scales.is_none());
    let (id, same_id) = (calibrated.register(context()), uniform.register(context()));
    assert_eq!(
        id, same_id,
        "a context's id depends on the weights and text only"
    );
    assert_ne!(pca2_bytes(&calibrated, &id), pca2_bytes(&uniform, &id));

    // An edge reads the calibrated encoding like any other.
    let source = ContextSource {
        cloud: Some(calibrated.edge_context(&id, Some(Codec::Pca2))),
        text: None,
    };
    let opts = GenerateOptions {
        max_tokens: 8,
        ..Default::default()
    };
    let q = [Message::new("user", "What does the cloud compute?")];
    let (tokens, stats) = chat_turn(e, &source, &q, &opts, |_, _| {}).unwrap();
    assert_eq!(tokens.len(), 8);
    assert_eq!(stats.summary().codec.as_deref(), Some("pca2"), "{stats:?}");
    drop((calibrated, uniform));

    // A profile for other weights, or not a profile at all, stops the server with the file's name and the cause.
    let refused = |what: &str| {
        let err = tandem_cloud::load_app(&ServeOptions {
            models: vec![weights.to_str().unwrap().into()],
            ..Default::default()
        })
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_else(|| panic!("a server started with {what}"));
        assert!(err.contains("kv-steps.json"), "{err}");
        err
    };
    let mut other = profile.clone();
    other.model = "0123abcd".into();
    other.save(&path_for(&weights)).unwrap();
    assert!(refused("a profile of other weights").contains("other weights"));
    std::fs::write(path_for(&weights), b"{\"model\": ").unwrap();
    assert!(refused("a truncated profile").contains("not a step profile"));
    std::fs::remove_dir_all(&dir).unwrap();
}
