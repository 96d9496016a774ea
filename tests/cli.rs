//! `egressd check` and `egressd explain` driven as a user would: the built binary, real files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn egressd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_egressd")).args(args).output().expect("run egressd")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn default_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/egressd.toml")
}

/// A scratch config directory with a main config and rule files.
struct Fixture {
    dir: tempfile::TempDir,
}

const MAIN: &str = r#"
[proxy]
listen = ["127.0.0.1:3128"]

[dns]
upstreams = ["127.0.0.1:5399"]

[policy]
default = "deny"
files = ["rules/*.toml"]
"#;

impl Fixture {
    fn new(main: &str, rules: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("rules")).unwrap();
        std::fs::write(dir.path().join("egressd.toml"), main).unwrap();
        for (name, body) in rules {
            std::fs::write(dir.path().join("rules").join(name), body).unwrap();
        }
        Self { dir }
    }

    fn write(&self, rel: &str, body: &str) {
        std::fs::write(self.dir.path().join(rel), body).unwrap();
    }

    fn config(&self) -> String {
        self.dir.path().join("egressd.toml").display().to_string()
    }

    fn check(&self) -> Output {
        egressd(&["check", "--config", &self.config()])
    }

    fn explain(&self, target: &str) -> Output {
        egressd(&["explain", "--config", &self.config(), target])
    }
}

const GOOD_RULES: &str = r#"
[[rule]]
name = "org"
hosts = ["example.org", "*.example.org"]
"#;

#[test]
fn check_default_config_prints_summary_and_exits_0() {
    let o = egressd(&["check", "--config", default_config().to_str().unwrap()]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.contains(": ok"), "{out}");
    assert!(out.contains("rules:"), "{out}");
    assert!(out.contains("names:"), "{out}");
    assert!(out.contains("cidrs:"), "{out}");
    assert!(out.contains("files:"), "{out}");
}

#[test]
fn check_typo_field_exits_1_with_position() {
    let f = Fixture::new(
        &MAIN.replace("listen = [\"127.0.0.1:3128\"]", "listne = [\"127.0.0.1:3128\"]"),
        &[("a.toml", GOOD_RULES)],
    );
    let o = f.check();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("egressd.toml:3:1:"), "{err}");
    assert!(err.contains("listne"), "{err}");
}

#[test]
fn check_typo_in_rule_file_exits_1_with_position() {
    let f = Fixture::new(MAIN, &[("a.toml", "[[rule]]\nname = \"x\"\nhost = [\"example.org\"]\n")]);
    let o = f.check();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("a.toml:3:1:") && err.contains("host"), "{err}");
}

#[test]
fn check_duplicate_rule_name_across_files() {
    let f = Fixture::new(
        MAIN,
        &[("a.toml", GOOD_RULES), ("b.toml", "\n\n[[rule]]\nname = \"org\"\nhosts = [\"example.net\"]\n")],
    );
    let o = f.check();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("b.toml:4:8:") && err.contains("duplicate rule name `org`") && err.contains("a.toml:2"),
        "{err}"
    );
}

#[test]
fn check_bad_cidr_names_field_and_position() {
    let f = Fixture::new(MAIN, &[("a.toml", "[[rule]]\nname = \"x\"\ncidrs = [\"10.0.0.0/33\"]\n")]);
    let o = f.check();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("a.toml:3:10: rule.cidrs:"), "{err}");
}

#[test]
fn check_reports_every_error_at_once() {
    let rules =
        "[[rule]]\nname = \"x\"\nhosts = [\"a..b\", \"f*.example.org\"]\nports = [0, 70000]\ncidrs = [\"1.2.3.4/8\"]\n";
    let f = Fixture::new(&MAIN.replace("default = \"deny\"", "default = \"maybe\""), &[("a.toml", rules)]);
    let o = f.check();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    for needle in [
        "policy.default",
        "a.toml:3:10: rule.hosts",
        "a.toml:3:18: rule.hosts",
        "a.toml:4:10: rule.ports",
        "a.toml:4:13: rule.ports",
        "a.toml:5:10: rule.cidrs",
    ] {
        assert!(err.contains(needle), "missing {needle}:\n{err}");
    }
}

#[test]
fn check_glob_matching_nothing_is_an_error() {
    let f = Fixture::new(&MAIN.replace("rules/*.toml", "nothing/*.toml"), &[("a.toml", GOOD_RULES)]);
    let o = f.check();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("matches no file"), "{err}");
}

#[test]
fn check_no_rule_files_is_an_error() {
    let f = Fixture::new(&MAIN.replace("files = [\"rules/*.toml\"]", "files = []"), &[]);
    let o = f.check();
    assert_eq!(o.status.code(), Some(1));
    let f = Fixture::new("[policy]\ndefault = \"deny\"\n", &[]);
    let o = f.check();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("policy.files"), "{err}");
}

#[test]
fn check_hosts_file_relative_to_rule_file_with_line_errors() {
    let f = Fixture::new(MAIN, &[("a.toml", "[[rule]]\nname = \"x\"\nhosts_files = [\"list.txt\"]\n")]);
    f.write("rules/list.txt", "# header\nexample.org\n0.0.0.0 a.example b.example\nbad name here\n");
    let o = f.check();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("list.txt:4:1:"), "{err}");
    f.write("rules/list.txt", "# header\nexample.org\n0.0.0.0 a.example b.example\n");
    let o = f.check();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(out.contains("names:    3"), "{out}");
}

#[test]
fn check_missing_hosts_file_is_an_error() {
    let f = Fixture::new(MAIN, &[("a.toml", "[[rule]]\nname = \"x\"\nhosts_files = [\"missing.txt\"]\n")]);
    let o = f.check();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("a.toml:3:16: rule.hosts_files") && err.contains("missing.txt"), "{err}");
}

#[test]
fn check_lints_shared_tenant_wildcards_shadowing_and_duplicates() {
    let rules = r#"
[[rule]]
name = "buckets"
hosts = ["*.s3.amazonaws.com", "*.github.io", "*.com", "*.my-team.example.org"]

[[rule]]
name = "everything-aws"
hosts = ["*.amazonaws.com"]

[[rule]]
name = "shadowed"
hosts = ["paste.example.net", "*.paste.example.net"]

[[rule]]
name = "dup"
hosts = ["*.my-team.example.org"]
cidrs = ["0.0.0.0/0"]

[[rule]]
name = "no-paste"
action = "deny"
hosts = [".paste.example.net"]
"#;
    let f = Fixture::new(MAIN, &[("a.toml", rules)]);
    let o = f.check();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    for needle in [
        "`*.s3.amazonaws.com`",
        "`*.github.io`",
        "`*.com`",
        "`*.amazonaws.com`",
        "rule `shadowed` never allows",
        "is listed by rule `buckets` and by rule `dup`",
        "0.0.0.0/0 is very wide",
    ] {
        assert!(out.contains(needle), "missing {needle}:\n{out}");
    }
    assert!(!out.contains("`*.my-team.example.org` is an exfiltration"), "{out}");
}

#[test]
fn explain_allow_names_rule_file_and_line() {
    let f = Fixture::new(MAIN, &[("a.toml", GOOD_RULES)]);
    let o = f.explain("http://WWW.Example.org./x");
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("decision: allow"), "{out}");
    assert!(out.contains("host:     www.example.org port 80"), "{out}");
    assert!(out.contains("rule:     org (") && out.contains("a.toml:2)"), "{out}");
    assert!(out.contains("reason:   rule"), "{out}");
    assert!(out.contains("not resolved"), "{out}");
}

#[test]
fn explain_deny_exits_3() {
    let f = Fixture::new(MAIN, &[("a.toml", GOOD_RULES)]);
    for target in [
        "http://badexample.org/",
        "example.org.evil.net:443",
        "http://2130706433/",
        "0x7f.1:443",
        "http://allowed@example.org/",
        "example.org",
        "ftp://example.org/",
        "dns:evil.net",
        "dns:www.example.org/TXT",
    ] {
        let o = f.explain(target);
        assert_eq!(o.status.code(), Some(3), "{target}: {}", text(&o).0);
        assert!(text(&o).0.contains("decision: deny"), "{target}");
    }
}

#[test]
fn explain_metadata_ip_is_guard_even_under_cidrs_rule() {
    let f = Fixture::new(MAIN, &[("a.toml", "[[rule]]\nname = \"meta\"\ncidrs = [\"169.254.0.0/16\"]\n")]);
    let o = f.explain("http://169.254.169.254/latest/meta-data/");
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(3));
    assert!(out.contains("reason:   guard"), "{out}");
    assert!(out.contains("cloud metadata"), "{out}");
    let o = f.explain("[::ffff:a9fe:a9fe]:443");
    assert_eq!(o.status.code(), Some(3));
    assert!(text(&o).0.contains("reason:   guard"));
}

#[test]
fn explain_dns_and_json() {
    let f = Fixture::new(MAIN, &[("a.toml", GOOD_RULES)]);
    let o = egressd(&["explain", "--config", &f.config(), "--json", "dns:api.example.org/AAAA"]);
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["action"], "allow");
    assert_eq!(v["rule"], "org");
    assert_eq!(v["qtype"], "AAAA");
    assert_eq!(v["kind"], "dns");
    let o = egressd(&["explain", "--config", &f.config(), "--json", "dns:api.example.org/TXT"]);
    assert_eq!(o.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["reason"], "qtype");
}

#[test]
fn explain_client_scoped_rules() {
    let rules = "[[rule]]\nname = \"lab\"\nhosts = [\"lab.example.org\"]\nclients = [\"10.1.0.0/16\"]\n";
    let f = Fixture::new(MAIN, &[("a.toml", rules)]);
    let o = egressd(&["explain", "--config", &f.config(), "--client", "10.1.2.3", "lab.example.org:443"]);
    assert_eq!(o.status.code(), Some(0));
    let o = egressd(&["explain", "--config", &f.config(), "--client", "10.2.2.3", "lab.example.org:443"]);
    assert_eq!(o.status.code(), Some(3));
    let o = f.explain("lab.example.org:443");
    assert_eq!(o.status.code(), Some(3));
    assert!(text(&o).0.contains("no --client given"));
}

#[test]
fn explain_broken_config_exits_1() {
    let f = Fixture::new("[policy\n", &[]);
    let o = f.explain("example.org:443");
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("egressd.toml:1:"), "{}", text(&o).1);
}

#[test]
fn run_refuses_an_upstream_that_is_its_own_dns_listener() {
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let main = format!(
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\n\n[dns]\nlisten = [\"127.0.0.1:{port}\"]\nupstreams = [\"127.0.0.1:{port}\"]\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[policy]\nfiles = [\"rules/*.toml\"]\n"
    );
    let f = Fixture::new(&main, &[("org.toml", GOOD_RULES)]);
    let o = egressd(&["run", "--config", &f.config()]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("own DNS listener"), "{err}");
}

#[test]
fn check_reports_an_upstream_that_is_its_own_dns_listener() {
    let main = "[dns]\nlisten = [\"127.0.0.1:8053\"]\nupstreams = [\"127.0.0.1:5399\", \"127.0.0.1:8053\"]\n\n[policy]\nfiles = [\"rules/*.toml\"]\n";
    let f = Fixture::new(main, &[("org.toml", GOOD_RULES)]);
    let o = f.check();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("egressd.toml:3:") && err.contains("dns.upstreams") && err.contains("127.0.0.1:8053"),
        "{err}"
    );
}
