//! Streaming decode: the pieces `TextStream` emits token by token join to exactly the whole decode, and a character
//! split across tokens is held back until it is complete (never emitted as U+FFFD); a streamed generation can be
//! cancelled.

use tandem_common::engine::GenerateOptions;
use tandem_common::tokenizer::TextStream;
use tandem_tests::{engine, llamacpp_fixture};

#[test]
fn streamed_pieces_join_to_the_whole_text() {
    let mut held_back = 0;
    for model in ["smollm2", "qwen-0.5b"] {
        let tok = &engine(model).tokenizer;
        for case in &llamacpp_fixture(model).tokenize {
            let mut stream = TextStream::new(tok);
            let mut joined = String::new();
            for &id in &case.ids {
                let piece = stream.push(id).unwrap();
                assert!(
                    !piece.contains('\u{FFFD}'),
                    "{model}: a partial character was emitted for {:?}",
                    case.text
                );
                held_back += usize::from(piece.is_empty());
                joined.push_str(&piece);
            }
            assert_eq!(
                joined,
                tok.decode(&case.ids).unwrap(),
                "{model}: streamed text of {:?}",
                case.text
            );
        }
    }
    assert!(
        held_back > 0,
        "the test texts include characters split across byte-level tokens"
    );
}

/// A generation stops after the token during which its cancel flag was set (a client that went away).
#[test]
fn cancel_stops_generation() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let e = engine("smollm2");
    let cancel = Arc::new(AtomicBool::new(false));
    let opts = GenerateOptions {
        max_tokens: 50,
        stop_at_eos: false,
        cancel: Some(cancel.clone()),
        ..Default::default()
    };
    let prompt = e.tokenizer.encode("Once upon a time").unwrap();
    let mut seen = 0;
    let (ids, _) = e
        .generate(&mut e.session(), &prompt, &opts, |_, _| {
            seen += 1;
            if seen == 3 {
                cancel.store(true, Ordering::Relaxed);
            }
        })
        .unwrap();
    assert_eq!(ids.len(), 3);
}
