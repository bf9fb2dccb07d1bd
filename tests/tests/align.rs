//! The alignment pipeline on real weights and real calibration text, on a small slice. The model is aligned to
//! itself (Qwen2.5-0.5B to Qwen2.5-0.5B: the real 1.5B → 0.5B fit is `just align`, its download too large for
//! every CI run), which gives answers that could not come out right by accident: every layer is most similar to
//! itself, so the monotone map must be the diagonal, and the projection must reconstruct held-out KV almost exactly.

use tandem_cloud::align::calibration::{Manifest, Split};
use tandem_cloud::align::eval::{EvalOptions, evaluate};
use tandem_cloud::align::{AlignError, Alignment, FitOptions, fit};
use tandem_tests::engine;

#[test]
fn self_alignment_maps_each_layer_to_itself_and_reconstructs_held_out_kv() {
    let manifest = Manifest::discover().unwrap();
    assert!(manifest.files.iter().any(|f| f.split == Split::HeldOut));
    assert_eq!(
        manifest.hash(),
        Manifest::discover().unwrap().hash(),
        "the split is deterministic"
    );
    let e = engine("qwen-0.5b");
    let opts = FitOptions {
        calibration_chunks: 3,
        held_out_chunks: 2,
        chunk_tokens: 160,
        gate_chunks: 1,
        gate_tokens: 12,
        gate_bands: 2,
    };
    let f = fit(e, e, &manifest, opts, &mut |m| eprintln!("{m}")).unwrap();
    let a = &f.alignment;
    eprintln!("{}", tandem_cloud::align::report(&f));

    // Monotone and complete: the diagonal.
    let map: Vec<usize> = a.layers.iter().map(|l| l.llm_layer).collect();
    assert_eq!(map, (0..e.model.config().n_layers).collect::<Vec<_>>());
    for (s, row) in f.sim_k.iter().enumerate() {
        assert!(
            (row[s] - 1.0).abs() < 1e-3,
            "layer {s} is itself: {}",
            row[s]
        );
    }
    // Held-out reconstruction far better than the mean (the zero-information baseline); exact up to rounding.
    for h in &f.held_out {
        assert!(h.k < 0.01 && h.v < 0.01, "layer {}: {h:?}", h.slm_layer);
    }
    // Projecting real KV gives the model's own KV back.
    let tokens = e
        .tokenizer
        .encode("fn main() { println!(\"hello\"); }")
        .unwrap();
    let kv = e.prefill_kv(&tokens).unwrap();
    let projected = a.project(&kv).unwrap();
    let (mut worst, mut scale) = (0f32, 0f32);
    for (p, k) in projected.layers.iter().zip(&kv.layers) {
        for (x, y) in p.k.iter().chain(&p.v).zip(k.k.iter().chain(&k.v)) {
            worst = worst.max((x - y).abs());
            scale = scale.max(y.abs());
        }
    }
    assert!(
        worst < 0.02 * scale,
        "projection off by {worst} (values up to {scale})"
    );

    // The evaluation's plumbing: with the model as its own LLM, the exact KV, the projected KV and every split read
    // the context as the "LLM" does.
    let opts = EvalOptions {
        files: 1,
        context_tokens: 96,
        continuation_tokens: 16,
        splits: vec![12],
    };
    let results = evaluate(e, e, a, &manifest, &opts, &mut |m| eprintln!("{m}")).unwrap();
    eprintln!(
        "{}",
        tandem_cloud::align::eval::markdown(&results, &opts, &a.id())
    );
    assert_eq!(results.files, 1);
    let results = results.modes;
    let by = |name: &str| results.iter().find(|r| r.mode.starts_with(name)).unwrap();
    let (exact, llm) = (by("SLM + exact"), by("LLM alone"));
    assert!(
        (exact.perplexity / llm.perplexity - 1.0).abs() < 1e-3,
        "{results:?}"
    );
    assert_eq!(exact.agreement, 1.0);
    for r in [by("SLM + projected"), by("split"), by("fused")] {
        assert!(
            (r.perplexity / exact.perplexity - 1.0).abs() < 0.02,
            "{results:?}"
        );
        assert!(r.agreement > 0.9, "{results:?}");
    }
    assert!(by("split").wire_bytes_per_token < exact.wire_bytes_per_token);

    // Gates are weights, fitted on calibration text, never worse there than the SLM's own KV alone.
    assert_eq!(a.gates.len(), a.slm.layers);
    assert!(a.gates.iter().all(|g| (0.0..=1.0).contains(g)));
    assert!(f.gates.fused_perplexity <= f.gates.own_perplexity);

    // The artifact: round trip, id, and refusals naming what is wrong.
    let bytes = a.to_bytes();
    let back = Alignment::from_bytes(&bytes).unwrap();
    assert_eq!(back.id(), a.id());
    assert_eq!(a.id().len(), 32);
    back.check_models(e.model.fingerprint(), e.model.fingerprint())
        .unwrap();
    let smol = engine("smollm2").model.fingerprint();
    match back.check_models(e.model.fingerprint(), smol) {
        Err(AlignError::WrongModel {
            which: "SLM",
            found,
            ..
        }) => assert_eq!(found, smol),
        other => panic!("expected WrongModel for the SLM, got {other:?}"),
    }
    let smol_kv = engine("smollm2").prefill_kv(&[1, 2, 3]).unwrap();
    assert!(matches!(
        back.project(&smol_kv),
        Err(AlignError::WrongModel { which: "LLM", .. })
    ));
    assert_eq!(
        Alignment::from_bytes(b"GGUF....").unwrap_err(),
        AlignError::BadMagic
    );
    let mut newer = bytes.clone();
    newer[12] = 9;
    assert_eq!(
        Alignment::from_bytes(&newer).unwrap_err(),
        AlignError::Format(9)
    );
    assert!(matches!(
        Alignment::from_bytes(&bytes[..bytes.len() / 2]),
        Err(AlignError::Corrupt(_))
    ));
}
