//! cargo fuzz target `client_hello`: the checks live in `egressd::fuzzing::client_hello`, shared with
//! `tests/fuzz_corpora.rs`, which replays `fuzz/corpus/client_hello` and `fuzz/regressions/client_hello`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| egressd::fuzzing::client_hello(data));
