//! Form and query decoding never panics, and what it decodes survives a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::plivo::form::{encode_pairs, parse_body, parse_pairs};

fuzz_target!(|data: &[u8]| {
    if let Ok(pairs) = parse_body(data) {
        let again = parse_pairs(&encode_pairs(&pairs)).expect("an encoded form decodes");
        assert_eq!(again, pairs);
    }
});
