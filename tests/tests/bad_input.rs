//! Bad input gets a clear error naming what is wrong: corrupt or truncated GGUF, unknown architecture, wrong model
//! hash, prompts over the context length, tokens outside the vocabulary.

use std::sync::Arc;

use tandem_common::engine::{Engine, default_device};
use tandem_common::gguf::{Gguf, GgufError};
use tandem_common::model::SessionError;
use tandem_common::models::{self, ModelLookupError};
use tandem_tests::gguf_writer::GgufWriter;
use tandem_tests::{engine, model_bytes};

fn parse(bytes: Vec<u8>) -> Result<Gguf, GgufError> {
    Gguf::parse(Arc::new(bytes))
}

#[test]
fn truncated_real_file_is_an_error_at_every_cut() {
    let full = model_bytes("smollm2");
    let header_end = 2_000_000.min(full.len());
    // Cuts through the header, metadata, tensor index and data: each must fail cleanly, never panic.
    let mut cuts: Vec<usize> = (0..64).collect();
    cuts.extend((64..header_end).step_by(9_973));
    cuts.extend([full.len() / 2, full.len() - 1]);
    for cut in cuts {
        let err = parse(full[..cut].to_vec()).expect_err("a truncated file must not parse");
        let msg = err.to_string();
        assert!(
            msg.contains("truncated") || msg.contains("magic"),
            "cut at {cut}: unclear error {msg:?}"
        );
    }
    assert!(parse(full.to_vec()).is_ok());
}

#[test]
fn corrupt_headers_name_the_problem() {
    assert!(matches!(
        parse(b"GGML\x03\0\0\0".to_vec()),
        Err(GgufError::BadMagic(_))
    ));
    let mut v9 = b"GGUF".to_vec();
    v9.extend_from_slice(&9u32.to_le_bytes());
    v9.extend_from_slice(&[0; 16]);
    assert!(matches!(parse(v9), Err(GgufError::UnsupportedVersion(9))));

    let bad_type = GgufWriter::default()
        .raw_kv("general.name", 99, &[0; 8])
        .finish();
    let err = parse(bad_type).unwrap_err();
    assert!(err.to_string().contains("general.name"), "{err}");

    // An array claiming 2^60 elements must fail on length, not try to allocate.
    let mut payload = 4u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&(1u64 << 60).to_le_bytes());
    let huge = GgufWriter::default()
        .raw_kv("tokenizer.ggml.scores", 9, &payload)
        .finish();
    assert!(matches!(parse(huge), Err(GgufError::Truncated { .. })));

    // Invalid UTF-8 in a string value.
    let mut s = 2u64.to_le_bytes().to_vec();
    s.extend_from_slice(&[0xff, 0xfe]);
    assert!(matches!(
        parse(GgufWriter::default().raw_kv("k", 8, &s).finish()),
        Err(GgufError::BadUtf8 { .. })
    ));

    // A tensor whose data would lie past the end of the file.
    let mut img = GgufWriter::default()
        .tensor_f32("w", &[4, 2], &[0.0; 8])
        .finish();
    img.truncate(img.len() - 4);
    let err = parse(img).unwrap_err();
    assert!(err.to_string().contains("\"w\""), "{err}");
}

#[test]
fn unknown_architecture_is_refused() {
    let img = GgufWriter::default()
        .string("general.architecture", "mamba")
        .tensor_f32("token_embd.weight", &[4, 2], &[0.0; 8])
        .finish();
    let g = parse(img).unwrap();
    let err = Engine::load(&g, &default_device())
        .err()
        .expect("mamba must be refused");
    assert!(
        err.to_string().contains("\"mamba\" is not supported"),
        "{err}"
    );
}

#[test]
fn wrong_hash_and_missing_models_are_reported() {
    let dir = std::env::temp_dir().join(format!("tandem-hash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = models::spec("smollm2").unwrap();
    let path = dir.join(&spec.file);
    std::fs::write(&path, b"not the weights").unwrap();
    let err = models::verify_sha256(&spec, &path).unwrap_err();
    assert!(matches!(err, ModelLookupError::WrongHash { .. }), "{err}");
    assert!(err.to_string().contains(&spec.sha256));
    std::fs::remove_dir_all(&dir).unwrap();

    let err = models::resolve("gpt-17").unwrap_err();
    assert!(
        err.to_string().contains("smollm2"),
        "the error lists known models: {err}"
    );
}

#[test]
fn over_long_prompts_and_bad_tokens_are_errors() {
    let e = engine("smollm2");
    let limit = e.model.config().context_length;
    let mut s = e.session();
    let err = s.prefill(&vec![42; limit + 1]).unwrap_err();
    assert_eq!(
        err,
        SessionError::TooLong {
            tokens: limit + 1,
            used: 0,
            limit
        }
    );
    assert_eq!(s.prefill(&[]).unwrap_err(), SessionError::Empty);
    let vocab = e.model.config().vocab;
    assert_eq!(
        s.prefill(&[vocab as u32]).unwrap_err(),
        SessionError::BadToken {
            id: vocab as u32,
            vocab
        }
    );
    // The session is still usable after refusing.
    assert_eq!(s.prefill(&[1, 2]).unwrap().len(), vocab);
}

/// Found by `just fuzz`: a tensor whose size in bytes overflows 64 bits (Q4_0 blocks of a huge shape) is refused by
/// name, not wrapped around to a small size that passes the bounds check.
#[test]
fn a_tensor_too_large_to_address_is_refused() {
    #[rustfmt::skip]
    let img = vec![
        0x47, 0x47, 0x55, 0x46, 0x03, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x43,
        0x47, 0x54, 0x32, 0x55, 0x46, 0x03, 0x00, 0x00, 0x00, 0x51, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x4f, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00
    ];
    let err = parse(img).unwrap_err().to_string();
    assert!(err.contains("overflow"), "{err}");
}
