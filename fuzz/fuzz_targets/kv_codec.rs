//! A KV layer payload under every codec and a shape taken from the input's first bytes: decoding is an error or
//! finite values of the right size, never a panic or a runaway allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_common::codec::{Codec, KvShape, RopeParams, decode_layer};

fuzz_target!(|data: &[u8]| {
    let [c, h, t, d, rest @ ..] = data else { return };
    let codec = Codec::ALL[*c as usize % Codec::ALL.len()];
    let shape = KvShape {
        kv_heads: 1 + *h as usize % 4,
        tokens: *t as usize,
        head_dim: 8 * (1 + *d as usize % 16),
    };
    let positions: Vec<u32> = (0..shape.tokens as u32).collect();
    // Few distinct ids, so the same-token prediction runs.
    let ids: Vec<u32> = positions.iter().map(|p| p % 7).collect();
    let rope = RopeParams { theta: 10_000.0, neox: *c & 0x80 != 0 };
    if let Ok(kv) = decode_layer(codec, shape, Some(rope.at(&positions)), &ids, rest) {
        let n = shape.kv_heads * shape.tokens * shape.head_dim;
        assert_eq!((kv.k.len(), kv.v.len()), (n, n));
        assert!(kv.k.iter().chain(&kv.v).all(|x| x.is_finite()));
    }
});
