//! KV state as a value: prefill(A+B) equals prefill(A) → export → serialise → import in a new session → prefill(B).

use tandem_common::kv::{KvError, KvState};
use tandem_common::model::{Logits, SessionError};
use tandem_common::quant::Precision;
use tandem_common::sample::argmax;
use tandem_tests::engine;

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// With f32 mat-muls the split is exact up to summation order (≤ 1e-4). With 8-bit activations (the fast path) a
/// tiny change of an activation can flip its rounding, so the logits move by up to ~0.5 (measured) — the same happens
/// in llama.cpp between a batched and a token-by-token prefill — and the chosen token stays the same.
fn split_prefill_matches(model: &str) {
    split_prefill_matches_at(model, Precision::F32, 1e-4);
    split_prefill_matches_at(model, Precision::Q8, 1.0);
}

fn split_prefill_matches_at(model: &str, precision: Precision, tol: f32) {
    let e = engine(model);
    let tok = &e.tokenizer;
    let a = tok
        .encode("<|im_start|>system\nYou answer questions about the tandem project. tandem splits inference between a cloud and an edge device; the cloud computes the KV cache of shared context once.<|im_end|>\n")
        .unwrap();
    let b = tok
        .encode("<|im_start|>user\nWhat does the cloud compute?<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    let whole: Vec<u32> = a.iter().chain(&b).copied().collect();

    let mut s = e.session();
    s.set_precision(precision);
    let expected = s.prefill(&whole).unwrap();

    let mut s_ctx = e.session();
    s_ctx.set_precision(precision);
    s_ctx.prefill(&a).unwrap();
    let ctx = s_ctx.export();
    assert_eq!(ctx.len(), a.len());
    assert_eq!(ctx.layers.len(), e.model.config().n_layers);
    let wire = ctx.to_bytes();
    let ctx = KvState::from_bytes(&wire).unwrap();

    let mut s2 = e.session();
    s2.set_precision(precision);
    s2.attach_context(&ctx).unwrap();
    let got = s2.prefill(&b).unwrap();
    let d = max_abs_diff(&expected, &got);
    eprintln!(
        "{model} {precision:?}: split prefill vs whole prefill, max |Δlogit| = {d:e} over {} logits",
        got.len()
    );
    assert!(
        d <= tol,
        "{model} {precision:?}: imported-context logits differ from a whole prefill by {d}"
    );
    assert_eq!(
        argmax(&got),
        argmax(&expected),
        "{model} {precision:?}: the next token changed"
    );

    // Decoding continues identically, and the exported state covers context + own tokens.
    let next = argmax(&got);
    let d2 = max_abs_diff(&s.decode(next).unwrap(), &s2.decode(next).unwrap());
    assert!(
        d2 <= tol,
        "{model} {precision:?}: decode after import differs by {d2}"
    );
    let all = s2.export();
    assert_eq!(all.len(), whole.len() + 1);
    assert_eq!(&all.tokens[..whole.len()], &whole[..]);
    let d3 = max_abs_diff(&all.layers[3].k, &s.export().layers[3].k);
    assert!(
        d3 <= tol,
        "{model} {precision:?}: exported keys differ by {d3}"
    );
}

#[test]
fn smollm2_split_prefill_equals_whole() {
    split_prefill_matches("smollm2");
}

#[test]
fn qwen05b_split_prefill_equals_whole() {
    split_prefill_matches("qwen-0.5b");
}

#[test]
fn slices_select_layers_and_tokens() {
    let e = engine("smollm2");
    let toks = e.tokenizer.encode("one two three four five six").unwrap();
    let kv = e.prefill_kv(&toks).unwrap();
    let s = kv.slice(2..5, 1..4).unwrap();
    assert_eq!((s.first_layer, s.layers.len(), s.len()), (2, 3, 3));
    assert_eq!(s.tokens, toks[1..4]);
    let d = kv.head_dim;
    // Head 1, token 1 of the slice is head 1, token 2 of the original, layer 3.
    let orig = &kv.layers[3].k[(kv.len() + 2) * d..(kv.len() + 3) * d];
    let cut = &s.layers[1].k[(3 + 1) * d..(3 + 2) * d];
    assert_eq!(orig, cut);
    assert!(matches!(
        kv.slice(0..99, 0..1),
        Err(KvError::OutOfRange { what: "layers", .. })
    ));
    assert!(matches!(
        kv.slice(0..1, 2..99),
        Err(KvError::OutOfRange { what: "tokens", .. })
    ));
    // A slice of layers can be sliced again only inside what it holds.
    assert!(s.slice(0..3, 0..1).is_err());
}

#[test]
fn bad_kv_is_refused_with_a_reason() {
    let e = engine("smollm2");
    let kv = e
        .prefill_kv(&e.tokenizer.encode("hello there").unwrap())
        .unwrap();

    let mut wrong_model = kv.clone();
    wrong_model.model = "qwen2-0000".into();
    let err = e.session().attach_context(&wrong_model).unwrap_err();
    assert!(
        matches!(err, SessionError::Kv(KvError::WrongModel { .. })),
        "{err}"
    );

    let mut short = kv.clone();
    short.layers[0].v.pop();
    assert!(matches!(
        KvState::from_bytes(&short.to_bytes()),
        Err(KvError::Corrupt(_))
    ));

    let bytes = kv.to_bytes();
    assert!(matches!(
        KvState::from_bytes(&bytes[..bytes.len() / 2]),
        Err(KvError::Corrupt(_))
    ));

    // Context can only be attached before the session has its own tokens.
    let mut s = e.session();
    s.prefill(&[1, 2, 3]).unwrap();
    assert_eq!(
        s.attach_context(&kv).unwrap_err(),
        SessionError::ContextAfterTokens
    );
}

/// A context prefilled in the session and made its shared context on the device (the edge's local fallback, which a
/// browser's GPU cannot read back) is exactly the context exported and attached: same logits, same exported KV.
#[test]
fn context_prefilled_in_place_equals_attached_context() {
    let e = engine("smollm2");
    let a = e
        .tokenizer
        .encode("Shared context: the edge prefills this itself.")
        .unwrap();
    let b = e.tokenizer.encode(" The user asks:").unwrap();

    let mut attached = e.session();
    attached.attach_context(&e.prefill_kv(&a).unwrap()).unwrap();
    let want = attached.prefill(&b).unwrap();

    let mut in_place = e.session();
    in_place.advance(&a).unwrap();
    in_place.own_as_context().unwrap();
    assert_eq!(in_place.len(), a.len());
    let got = in_place.prefill(&b).unwrap();
    assert_eq!(got, want);
    assert_eq!(in_place.export(), attached.export());
    // Only once: the context is in place.
    assert_eq!(in_place.own_as_context(), Err(SessionError::HasContext));
}

/// A context whose layers arrive while the prompt is prefilled gives the same logits as one attached whole; a stream
/// that breaks mid-way leaves the session as it was.
#[test]
fn streamed_context_equals_attached_context() {
    let e = engine("smollm2");
    let a = e
        .tokenizer
        .encode("Shared context: the cloud prefills this once.")
        .unwrap();
    let b = e.tokenizer.encode(" The edge asks:").unwrap();
    let ctx = e.prefill_kv(&a).unwrap();

    let mut attached = e.session();
    attached.attach_context(&ctx).unwrap();
    let want = attached.prefill(&b).unwrap();

    let mut asked = Vec::new();
    let mut streamed = e.session();
    let got = streamed
        .prefill_streamed(&ctx, &b, &mut |l| {
            asked.push(l);
            Ok(ctx.layers[l].clone().into())
        })
        .and_then(Logits::read)
        .unwrap();
    assert_eq!(asked, (0..e.model.config().n_layers).collect::<Vec<_>>());
    assert_eq!(got, want);

    let mut broken = e.session();
    let err = broken
        .prefill_streamed(&ctx, &b, &mut |l| {
            if l < 5 {
                Ok(ctx.layers[l].clone().into())
            } else {
                Err("connection reset".into())
            }
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "shared context stream failed at layer 5: connection reset"
    );
    assert!(broken.is_empty());
    let whole: Vec<u32> = a.iter().chain(&b).copied().collect();
    let local = broken.prefill(&whole).unwrap();
    assert_eq!(argmax(&local), argmax(&want));
}

/// The fused mode's second reading of the context, blended by a gate: the same KV again changes nothing, gate 0
/// leaves it out, and a different reading moves the answer the more, the larger its gate.
#[test]
fn gated_second_reading_of_the_context() {
    let e = engine("smollm2");
    let n = e.model.config().n_layers;
    let tok = &e.tokenizer;
    let a = tok
        .encode("<|im_start|>system\nThe cat is called Miso and sleeps on the piano.<|im_end|>\n")
        .unwrap();
    let b = tok
        .encode("<|im_start|>user\nWhat is the cat called?<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    let ctx = e.prefill_kv(&a).unwrap();
    let logits = |gated: Option<(&KvState, f32)>| {
        let mut s = e.session();
        s.set_precision(Precision::F32);
        s.attach_context(&ctx).unwrap();
        if let Some((kv, g)) = gated {
            s.attach_gated(kv, &vec![g; n]).unwrap();
        }
        s.prefill(&b).unwrap()
    };
    let alone = logits(None);
    assert!(max_abs_diff(&alone, &logits(Some((&ctx, 0.5)))) < 1e-3);
    assert!(max_abs_diff(&alone, &logits(Some((&ctx, 1.0)))) < 1e-3);
    assert_eq!(alone, logits(Some((&ctx, 0.0))));

    let mut other = ctx.clone();
    for l in &mut other.layers {
        l.v.iter_mut().for_each(|x| *x = -*x);
    }
    let (strong, weak) = (
        max_abs_diff(&alone, &logits(Some((&other, 1.0)))),
        max_abs_diff(&alone, &logits(Some((&other, 0.1)))),
    );
    eprintln!("a negated reading moves the logits by {strong} at gate 1, {weak} at gate 0.1");
    assert!(strong > 1.0 && weak < strong / 4.0, "{strong} vs {weak}");

    let mut s = e.session();
    s.attach_context(&ctx).unwrap();
    assert!(matches!(
        s.attach_gated(&ctx, &vec![0.0; n - 1]),
        Err(SessionError::Kv(KvError::WrongShape { .. }))
    ));
    assert!(s.attach_gated(&ctx, &vec![f32::NAN; n]).is_err());
    assert!(s.attach_gated(&ctx, &vec![1.5; n]).is_err());
    let shorter = e.prefill_kv(&a[..a.len() - 1]).unwrap();
    assert!(matches!(
        s.attach_gated(&shorter, &vec![0.0; n]),
        Err(SessionError::Kv(KvError::Corrupt(_)))
    ));
}
