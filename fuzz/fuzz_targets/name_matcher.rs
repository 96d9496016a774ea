//! cargo fuzz target `name_matcher`: the checks live in `egressd::fuzzing::name_matcher`, shared with
//! `tests/fuzz_corpora.rs`, which replays `fuzz/corpus/name_matcher` and `fuzz/regressions/name_matcher`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| egressd::fuzzing::name_matcher(data));
