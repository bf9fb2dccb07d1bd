//! A GGUF file as a browser or a cache hands it over: parsing never panics, and every tensor it accepts lies inside
//! the file.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tandem_common::gguf::Gguf;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = Gguf::parse(Arc::new(data.to_vec())) {
        for t in g.tensors.values() {
            assert_eq!(g.tensor_bytes(t).len() as u64, t.size);
        }
    }
});
