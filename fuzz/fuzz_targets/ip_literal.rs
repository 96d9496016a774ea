//! cargo fuzz target `ip_literal`: the checks live in `egressd::fuzzing::ip_literal`, shared with
//! `tests/fuzz_corpora.rs`, which replays `fuzz/corpus/ip_literal` and `fuzz/regressions/ip_literal`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| egressd::fuzzing::ip_literal(data));
