//! Replays the fuzz corpora on stable Rust: every file under `fuzz/corpus/<target>/` and every
//! past crash input under `fuzz/regressions/<target>/` goes through the same checks as the
//! cargo-fuzz target (`egressd::fuzzing::<target>`), so a fixed crash or mismatch never returns.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        files.extend(entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_file()));
    }
    files.sort();
    files
}

fn replay(target: &str, check: fn(&[u8])) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no corpus for fuzz target {target}");
    let mut failed = Vec::new();
    for path in &files {
        let data = match std::fs::read(path) {
            Ok(d) => d,
            // A fuzzer running on the same corpus may have just replaced the file.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{}: {e}", path.display()),
        };
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{target}: {} of {} inputs fail:\n{}", failed.len(), files.len(), failed.join("\n"));
}

#[test]
fn name_matcher() {
    replay("name_matcher", egressd::fuzzing::name_matcher);
}

#[test]
fn ip_literal() {
    replay("ip_literal", egressd::fuzzing::ip_literal);
}

#[test]
fn config() {
    replay("config", egressd::fuzzing::config);
}

#[test]
fn client_hello() {
    replay("client_hello", egressd::fuzzing::client_hello);
}

#[test]
fn http_head() {
    replay("http_head", egressd::fuzzing::http_head);
}

#[test]
fn dns_message() {
    replay("dns_message", egressd::fuzzing::dns_message);
}
