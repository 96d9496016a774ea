#!/usr/bin/env python3
"""Helpers of deploy/check.sh: things a shell one-liner would get wrong.

  checklib.py hcl FILE...                     parse every .tf with python-hcl2 (the tools venv)
  checklib.py render TEMPLATE VARS.json OUT   render a Terraform template (.tftpl) with the
                                              subset of the template language the deploy/
                                              templates use: ${name}, ${jsonencode(name)},
                                              %{ if length(name) > 0 } ... %{ endif }; any other
                                              directive or expression is an error, so this never
                                              renders a template differently from Terraform silently
  checklib.py policy FILE.json README.md      an IAM policy: JSON, Version 2012-10-17, every
                                              statement has a Sid explained in README.md
  checklib.py configmap MANIFEST DEPLOYMENT OUTDIR
                                              write the ConfigMap's keys to OUTDIR at the paths the
                                              Deployment's configMap volume items give them
  checklib.py healthcheck DOCKERFILE          print the HEALTHCHECK's exec-form CMD, one argument a line
  checklib.py metric-names SCRAPE FILE...     every egressd_* metric name used in FILE... is in the
                                              scrape (Prometheus text format; _bucket/_sum/_count of
                                              histograms included)
"""

import json
import re
import sys
from pathlib import Path


def fail(msg: str) -> None:
    print(msg, file=sys.stderr)
    sys.exit(1)


def cmd_hcl(files: list[str]) -> None:
    import hcl2  # python-hcl2, installed by check.sh in its own venv

    for f in files:
        with open(f, encoding="utf-8") as fh:
            try:
                hcl2.load(fh)
            except Exception as e:  # noqa: BLE001 - any parse error is a finding
                fail(f"{f}: HCL parse error: {e}")
        print(f"  parsed {f}")


INTERP = re.compile(r"\$\{([^}]*)\}")
IF_OPEN = re.compile(r"%\{\s*if\s+length\((\w+)\)\s*>\s*0\s*\}")
IF_CLOSE = re.compile(r"%\{\s*endif\s*\}")


def render(text: str, env: dict) -> str:
    # Conditionals first (not nested: the templates here never nest them).
    out, pos = [], 0
    while True:
        m = IF_OPEN.search(text, pos)
        if not m:
            out.append(text[pos:])
            break
        end = IF_CLOSE.search(text, m.end())
        if not end:
            fail(f"unclosed %{{ if }} at offset {m.start()}")
        out.append(text[pos : m.start()])
        name = m.group(1)
        if name not in env:
            fail(f"template variable {name} not given")
        if len(env[name]) > 0:
            out.append(text[m.end() : end.start()])
        pos = end.end()
    text = "".join(out)
    if "%{" in text:
        fail("unsupported template directive: " + text[text.index("%{") : text.index("%{") + 40])

    def interp(m: re.Match) -> str:
        expr = m.group(1).strip()
        j = re.fullmatch(r"jsonencode\((\w+)\)", expr)
        name = j.group(1) if j else expr
        if not re.fullmatch(r"\w+", name):
            fail(f"unsupported template expression: ${{{expr}}}")
        if name not in env:
            fail(f"template variable {name} not given")
        value = env[name]
        if j:
            return json.dumps(value, separators=(",", ":"))
        if not isinstance(value, (str, int, float)):
            fail(f"template variable {name} is not a string or number")
        return str(value)

    # Terraform's escape for a literal ${ is $${.
    text = text.replace("$${", "\0")
    text = INTERP.sub(interp, text)
    return text.replace("\0", "${")


def cmd_render(template: str, vars_json: str, out: str) -> None:
    env = json.loads(Path(vars_json).read_text(encoding="utf-8"))
    # Values given as {"file": PATH} are read from that file (Terraform's file()).
    for k, v in list(env.items()):
        if isinstance(v, dict) and set(v) == {"file"}:
            env[k] = Path(v["file"]).read_text(encoding="utf-8")
    Path(out).write_text(render(Path(template).read_text(encoding="utf-8"), env), encoding="utf-8")


def cmd_policy(policy: str, readme: str) -> None:
    try:
        doc = json.loads(Path(policy).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        fail(f"{policy}: not JSON: {e}")
    if doc.get("Version") != "2012-10-17":
        fail(f"{policy}: Version must be 2012-10-17")
    explained = Path(readme).read_text(encoding="utf-8")
    sids = []
    for st in doc.get("Statement", []):
        sid = st.get("Sid")
        if not sid:
            fail(f"{policy}: a statement has no Sid")
        if st.get("Effect") not in ("Allow", "Deny"):
            fail(f"{policy}: {sid}: Effect must be Allow or Deny")
        if "Principal" not in st or "Action" not in st or "Resource" not in st:
            fail(f"{policy}: {sid}: Principal, Action and Resource are required")
        if f"`{sid}`" not in explained:
            fail(f"{policy}: statement {sid} is not explained in {readme}")
        sids.append(sid)
    if len(set(sids)) != len(sids):
        fail(f"{policy}: duplicate Sid")
    print(f"  {policy}: {len(sids)} statements, each explained")


def cmd_configmap(manifest: str, deployment: str, outdir: str) -> None:
    import yaml  # PyYAML, a dependency of yamllint

    cms = [d for d in yaml.safe_load_all(Path(manifest).read_text(encoding="utf-8")) if d and d.get("kind") == "ConfigMap"]
    if len(cms) != 1:
        fail(f"{manifest}: expected one ConfigMap")
    data = cms[0]["data"]
    deps = [d for d in yaml.safe_load_all(Path(deployment).read_text(encoding="utf-8")) if d and d.get("kind") == "Deployment"]
    vols = [v for v in deps[0]["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    items = vols[0]["configMap"].get("items") or [{"key": k, "path": k} for k in data]
    missing = set(data) - {i["key"] for i in items}
    if missing:
        fail(f"{deployment}: ConfigMap keys not mounted: {sorted(missing)}")
    for item in items:
        if item["key"] not in data:
            fail(f"{deployment}: volume item {item['key']} is not a key of the ConfigMap")
        dest = Path(outdir) / item["path"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(data[item["key"]], encoding="utf-8")
    print(f"  {len(items)} ConfigMap keys laid out as the Pod sees them")


def cmd_metric_names(scrape: str, files: list[str]) -> None:
    exposed = set()
    for line in Path(scrape).read_text(encoding="utf-8").splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            exposed.add(name)
            if kind == "histogram":
                exposed.update({name + "_bucket", name + "_sum", name + "_count"})
        elif line and not line.startswith("#"):
            exposed.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    if not exposed:
        fail(f"{scrape}: no metric in the scrape")
    bad = 0
    for f in files:
        used = set(re.findall(r"\begressd_[a-z0-9_]+", Path(f).read_text(encoding="utf-8")))
        unknown = sorted(used - exposed)
        if unknown:
            print(f"  {f}: not exported by egressd: {', '.join(unknown)}", file=sys.stderr)
            bad += 1
        else:
            print(f"  {f}: {len(used)} metric names, all exported by egressd")
    if bad:
        sys.exit(1)


def cmd_healthcheck(dockerfile: str) -> None:
    text = Path(dockerfile).read_text(encoding="utf-8").replace("\\\n", " ")
    found = [line for line in text.splitlines() if line.strip().upper().startswith("HEALTHCHECK")]
    if len(found) != 1:
        fail(f"{dockerfile}: expected one HEALTHCHECK, found {len(found)}")
    m = re.search(r"\bCMD\s+(\[.*\])\s*$", found[0])
    if not m:
        fail(f"{dockerfile}: HEALTHCHECK must use the exec form CMD [...] (no shell in the image)")
    for arg in json.loads(m.group(1)):
        print(arg)


def main() -> None:
    if len(sys.argv) < 2:
        fail(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "hcl" and args:
        cmd_hcl(args)
    elif cmd == "render" and len(args) == 3:
        cmd_render(*args)
    elif cmd == "policy" and len(args) == 2:
        cmd_policy(*args)
    elif cmd == "configmap" and len(args) == 3:
        cmd_configmap(*args)
    elif cmd == "healthcheck" and len(args) == 1:
        cmd_healthcheck(args[0])
    elif cmd == "metric-names" and len(args) >= 2:
        cmd_metric_names(args[0], args[1:])
    else:
        fail(__doc__)


if __name__ == "__main__":
    main()
