//! tandem vs llama.cpp on the same GGUF files: tokenization, next-token logits and greedy continuations.
//!
//! The fixtures (tests/fixtures/llamacpp_*.json) were made by scripts/make_fixtures.py with llama.cpp itself.
//! Logits may differ slightly (both quantize activations to 8 bits, in different block sizes), so a greedy choice
//! may only differ where llama.cpp's own top-2 logits are a near-tie.

use tandem_common::sample::argmax;
use tandem_tests::{engine, llamacpp_fixture};

/// Allowed difference of a top-5 logit between tandem and llama.cpp: `ABS + REL·|logit|`. Both round activations to
/// 8 bits (in different block sizes) and llama.cpp keeps its KV cache in f16, so their errors add up: llama.cpp alone
/// differs from exact f32 arithmetic by up to 0.87 on these runs, and the difference grows with the logit's size.
const LOGIT_TOL_ABS: f32 = 0.6;
const LOGIT_TOL_REL: f32 = 0.04;
/// A greedy choice may differ from llama.cpp's only where llama.cpp's top-2 logit gap is below this.
const NEAR_TIE: f32 = 0.25;

fn tokenization_matches(model: &str) {
    let e = engine(model);
    let f = llamacpp_fixture(model);
    for case in &f.tokenize {
        assert_eq!(
            e.tokenizer.encode(&case.text).unwrap(),
            case.ids,
            "{model}: tokenization of {:?}",
            case.text
        );
        let round = e.tokenizer.decode(&case.ids).unwrap();
        assert_eq!(round, case.text, "{model}: decode of {:?}", case.text);
    }
    for run in &f.greedy {
        let text = tandem_common::tokenizer::chatml(
            &[tandem_common::tokenizer::Message::new("user", &run.prompt)],
            true,
        );
        assert_eq!(
            e.tokenizer.encode(&text).unwrap(),
            run.prompt_ids,
            "{model}: chat template of {:?}",
            run.prompt
        );
    }
}

/// Teacher-forced on llama.cpp's tokens: every step's logits agree, and our top-1 matches or it is a near-tie.
/// Then free-running: our own greedy continuation equals llama.cpp's up to a near-tie.
fn greedy_matches(model: &str) {
    let e = engine(model);
    let f = llamacpp_fixture(model);
    let (mut steps, mut exact, mut max_diff, mut max_ratio, mut equal_runs) = (0, 0, 0f32, 0f32, 0);
    for run in &f.greedy {
        let mut s = e.session();
        let mut logits = s.prefill(&run.prompt_ids).unwrap();
        for (i, step) in run.steps.iter().enumerate() {
            for (&id, &l) in step.top_ids.iter().zip(&step.top_logits) {
                let d = (logits[id as usize] - l).abs();
                max_diff = max_diff.max(d);
                max_ratio = max_ratio.max(d / (LOGIT_TOL_ABS + LOGIT_TOL_REL * l.abs()));
                assert!(
                    d <= LOGIT_TOL_ABS + LOGIT_TOL_REL * l.abs(),
                    "{model} {:?} step {i}: logit of token {id} is {} here, {l} in llama.cpp",
                    run.prompt,
                    logits[id as usize]
                );
            }
            let ours = argmax(&logits);
            steps += 1;
            if ours == step.top_ids[0] {
                exact += 1;
            } else {
                let gap = step.top_logits[0] - step.top_logits[1];
                assert!(
                    ours == step.top_ids[1] && gap < NEAR_TIE,
                    "{model} {:?} step {i}: tandem picks {ours}, llama.cpp {} (llama.cpp's top-2 gap {gap}, not a near-tie)",
                    run.prompt,
                    step.top_ids[0]
                );
            }
            logits = s.decode(step.top_ids[0]).unwrap();
        }

        // Free-running greedy continuation.
        let mut s = e.session();
        let mut logits = s.prefill(&run.prompt_ids).unwrap();
        let mut diverged = false;
        for (i, step) in run.steps.iter().enumerate() {
            let ours = argmax(&logits);
            if ours != step.top_ids[0] {
                let gap = step.top_logits[0] - step.top_logits[1];
                assert!(
                    gap < NEAR_TIE,
                    "{model} {:?}: free-running continuation diverges at step {i} with gap {gap}",
                    run.prompt
                );
                diverged = true;
                break;
            }
            logits = s.decode(ours).unwrap();
        }
        equal_runs += usize::from(!diverged);
    }
    eprintln!(
        "{model}: {exact}/{steps} teacher-forced greedy steps equal llama.cpp's, max top-5 logit difference {max_diff:.4} ({:.0}% of its tolerance); \
         {equal_runs}/{} free-running 32-token continuations identical",
        max_ratio * 100.0,
        f.greedy.len()
    );
    assert!(
        equal_runs * 3 >= f.greedy.len(),
        "{model}: only {equal_runs} continuations identical to llama.cpp's"
    );
}

#[test]
fn smollm2_tokenization_matches_llamacpp() {
    tokenization_matches("smollm2");
}

#[test]
fn qwen05b_tokenization_matches_llamacpp() {
    tokenization_matches("qwen-0.5b");
}

#[test]
fn smollm2_greedy_matches_llamacpp() {
    greedy_matches("smollm2");
}

#[test]
fn qwen05b_greedy_matches_llamacpp() {
    greedy_matches("qwen-0.5b");
}
