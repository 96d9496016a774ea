//! cargo fuzz target `http_head`: the checks live in `egressd::fuzzing::http_head`, shared with
//! `tests/fuzz_corpora.rs`, which replays `fuzz/corpus/http_head` and `fuzz/regressions/http_head`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| egressd::fuzzing::http_head(data));
