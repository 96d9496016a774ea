//! cargo fuzz target `dns_message`: the checks live in `egressd::fuzzing::dns_message`, shared with
//! `tests/fuzz_corpora.rs`, which replays `fuzz/corpus/dns_message` and `fuzz/regressions/dns_message`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| egressd::fuzzing::dns_message(data));
