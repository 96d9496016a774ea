//! The pure hot path: decision time with the demo policy and with a 1,000,000-name hosts file,
//! the policy build time, and the resident memory the 1M-name policy holds.
//!
//! Run: `cargo bench --bench policy`. Memory is printed as `rss_delta_mib` (resident set growth
//! from loading the policy, read from /proc/self/statm), since criterion measures time only.

mod common;
use common::name;

use std::hint::black_box;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use egressd::config::{self, Loaded};
use egressd::policy::name::normalize_host;
use egressd::policy::{Facts, Surface};

const NAMES: usize = 1_000_000;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    pages * 4096
}

/// Writes a config whose one allow rule lists `NAMES` names from a hosts file.
fn million_name_config() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(&rules).expect("mkdir");
    let mut f = std::io::BufWriter::new(std::fs::File::create(rules.join("big.txt")).expect("create"));
    for i in 0..NAMES {
        writeln!(f, "{}", name(i)).expect("write");
    }
    f.flush().expect("flush");
    std::fs::write(
        rules.join("big.toml"),
        "[[rule]]\nname = \"big\"\nhosts_files = [\"big.txt\"]\n\n[[rule]]\nname = \"deny\"\naction = \"deny\"\nhosts = [\".paste.example\"]\n",
    )
    .expect("write rules");
    let main = dir.path().join("egressd.toml");
    std::fs::write(&main, "[dns]\nupstreams = [\"127.0.0.1:53\"]\n[policy]\nfiles = [\"rules/*.toml\"]\n")
        .expect("write main");
    (dir, main)
}

fn decide_all(loaded: &Loaded, hosts: &[egressd::policy::name::Host]) -> usize {
    hosts
        .iter()
        .filter(|h| {
            let f =
                Facts { host: h, port: Some(443), client: None, method: None, body_len: None, surface: Surface::Proxy };
            loaded.policy.decide(&f).action.permits()
        })
        .count()
}

fn demo(c: &mut Criterion) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/egressd.toml");
    let loaded = config::load(&path).expect("demo config loads");
    let hosts: Vec<_> =
        ["www.example.org", "api.sagemaker.us-east-1.amazonaws.com", "x.pastebin.com", "unknown.example.net"]
            .iter()
            .map(|h| normalize_host(h).expect("valid"))
            .collect();
    c.bench_function("decide/demo (4 names, mixed)", |b| b.iter(|| decide_all(&loaded, black_box(&hosts))));
    c.bench_function("normalize+decide/demo one name", |b| {
        b.iter(|| {
            let h = normalize_host(black_box("Www.Example.Org")).expect("valid");
            let f = Facts {
                host: &h,
                port: Some(443),
                client: None,
                method: None,
                body_len: None,
                surface: Surface::Proxy,
            };
            loaded.policy.decide(&f)
        })
    });
}

fn million(c: &mut Criterion) {
    let (_dir, main) = million_name_config();
    let before = rss_bytes();
    let t = Instant::now();
    let loaded = config::load(&main).expect("1M config loads");
    let build = t.elapsed();
    let after = rss_bytes();
    println!(
        "policy/1M: names={} build_s={:.3} rss_delta_mib={:.1} rss_total_mib={:.1} matcher_heap_mib={:.1}",
        loaded.policy.names().len(),
        build.as_secs_f64(),
        (after.saturating_sub(before)) as f64 / 1048576.0,
        after as f64 / 1048576.0,
        loaded.policy.names().heap_bytes() as f64 / 1048576.0
    );
    // A mix of listed names (hits), unlisted names (default deny) and a deny-rule hit.
    let hosts: Vec<_> = (0..64)
        .map(|i| match i % 4 {
            0 | 1 => name(i * 7919 % NAMES),
            2 => format!("nothere-{i}.example.net"),
            _ => format!("a{i}.paste.example"),
        })
        .map(|h| normalize_host(&h).expect("valid"))
        .collect();
    let mut g = c.benchmark_group("decide/1M");
    g.throughput(criterion::Throughput::Elements(hosts.len() as u64));
    g.bench_function("64 decisions", |b| b.iter(|| decide_all(&loaded, black_box(&hosts))));
    g.finish();
    drop(loaded);
    let mut g = c.benchmark_group("build/1M");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("load+compile", |b| b.iter(|| config::load(&main).expect("loads")));
    g.finish();
}

criterion_group!(benches, demo, million);
criterion_main!(benches);
