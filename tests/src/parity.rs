//! Comparing a WebAssembly edge's greedy answer with native's.
//!
//! The wasm builds compute the same model but not in the same float order (no FMA, other SIMD kernels in burn's CPU
//! matmul, another libm): logits differ by ~0.01, so where native's two best tokens are closer than [`NEAR_TIE`] the
//! wasm edge may pick the other. Up to the first such near-tie, tokens must be identical.

use tandem_common::tokenizer::{Message, TextStream};

use crate::engine;

pub const NEAR_TIE: f32 = 0.1;

/// Native greedy pieces of the answer to `question` after `context` (prefilled here, which is exactly the lossless
/// cloud path) and, per step, the gap between the best and second-best logits.
pub fn native_steps(
    model: &str,
    context: &str,
    question: &str,
    tokens: usize,
) -> Vec<(String, f32)> {
    let e = engine(model);
    let mut s = e.session();
    let ctx = e.tokenizer.context_tokens(context).unwrap();
    s.attach_context(&e.prefill_kv(&ctx).unwrap()).unwrap();
    let prompt = e
        .tokenizer
        .chat_tokens(&[Message::new("user", question)], true)
        .unwrap();
    let mut logits = s.prefill(&prompt).unwrap();
    let mut text = TextStream::new(&e.tokenizer);
    let mut steps = Vec::new();
    for _ in 0..tokens {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let (best, gap) = (order[0] as u32, logits[order[0]] - logits[order[1]]);
        if e.tokenizer.is_stop(best) {
            break;
        }
        steps.push((text.push(best).unwrap(), gap));
        logits = s.decode(best).unwrap();
    }
    steps
}

/// Asserts `got` (`what`'s pieces) is native's answer up to its first near-tie, which must not come too early to
/// mean anything.
pub fn assert_same_answer(got: &[String], native: &[(String, f32)], what: &str) {
    let sure = native
        .iter()
        .position(|(_, gap)| *gap < NEAR_TIE)
        .unwrap_or(native.len());
    assert!(
        sure >= 6,
        "native's answer has a near-tie at token {sure}: pick another question"
    );
    let want: Vec<&str> = native[..sure].iter().map(|(t, _)| t.as_str()).collect();
    let got: Vec<&str> = got.iter().take(sure).map(String::as_str).collect();
    assert_eq!(got, want, "{what} vs native, first {sure} tokens");
}
