//! cargo fuzz target `config`: the checks live in `egressd::fuzzing::config`, shared with
//! `tests/fuzz_corpora.rs`, which replays `fuzz/corpus/config` and `fuzz/regressions/config`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| egressd::fuzzing::config(data));
