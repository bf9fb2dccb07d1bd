//! A WebSocket message as the cloud or an edge receives it: decoding never panics, and what decodes re-encodes to
//! a message that decodes to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_common::wire::{decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = decode(data) {
        assert_eq!(decode(&encode(&frame)).expect("re-encoded frame decodes"), frame);
    }
});
