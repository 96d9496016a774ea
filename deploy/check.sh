#!/usr/bin/env bash
# deploy/check.sh — every deployment artefact through a real validator; any finding fails.
#
#   hadolint           deploy/Dockerfile (every severity, style included)
#   checkov            deploy/aws/terraform, deploy/kubernetes, deploy/Dockerfile
#                      (skips are justified next to the resource: #checkov:skip= / checkov.io/skip)
#   python-hcl2        parses every .tf
#   promtool           check rules, test rules (alerts_test.yml), check config (both configs)
#   systemd-analyze    verify the units (in a scratch root with the binary paths present) and
#                      security --offline with an exposure threshold
#   yamllint           Compose, Kubernetes and Prometheus YAML (deploy/.yamllint)
#   ShellCheck         every shell script of the repository, and the rendered EC2 user-data
#   json.tool          the Grafana dashboard and the rendered IAM policies
#   egressd            `egressd check` on every config an artefact ships (image, Kubernetes
#                      ConfigMap, Terraform-rendered appliance config); the image config run for
#                      real: the Dockerfile's HEALTHCHECK command against /readyz, the metric names
#                      of the alerts and the dashboard against /metrics, and the rule-sync script
#                      swapping a good rule set in and refusing a bad one while egressd runs
# Terraform itself is not installed here (it is not in the package registries this project
# uses): nothing runs `terraform validate`; see deploy/README.md.
#
# Tools: Debian packages (shellcheck, prometheus for promtool, systemd, busybox) are installed
# with apt-get when run as root with CI=true; the Python validators go into venvs under
# ${EGRESSD_TOOLS_DIR:-~/.cache/egressd-deploy-tools}, pinned by deploy/requirements-*.txt.
# EGRESSD=path/to/egressd tests another build (default: ${CARGO_TARGET_DIR:-target}/release/egressd,
# built if missing).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
D=deploy

unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY
export no_proxy="" NO_PROXY=""

# --- tools --------------------------------------------------------------------------------------
missing_pkgs=()
command -v shellcheck >/dev/null || missing_pkgs+=(shellcheck)
command -v promtool >/dev/null || missing_pkgs+=(prometheus)
command -v systemd-analyze >/dev/null || missing_pkgs+=(systemd)
command -v busybox >/dev/null || missing_pkgs+=(busybox)
command -v python3 >/dev/null || missing_pkgs+=(python3)
if ((${#missing_pkgs[@]} > 0)); then
    if [[ "${CI:-}" == "true" && "$(id -u)" == "0" ]]; then
        echo "installing: ${missing_pkgs[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing_pkgs[@]}" >/dev/null
    else
        echo "missing: ${missing_pkgs[*]} (apt-get install ${missing_pkgs[*]}, or run as root with CI=true)" >&2
        exit 2
    fi
fi
if ! python3 -m venv --help >/dev/null 2>&1; then
    if [[ "${CI:-}" == "true" && "$(id -u)" == "0" ]]; then
        apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    else
        echo "python3 has no venv module (apt-get install python3-venv)" >&2
        exit 2
    fi
fi

TOOLS="${EGRESSD_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/egressd-deploy-tools}"
# venv NAME REQUIREMENTS: a venv with exactly these pinned requirements, reused while they match.
venv() {
    local dir="$TOOLS/$1" req="$ROOT/$2"
    if [[ ! -x "$dir/bin/python" ]] || ! cmp -s "$req" "$dir/.requirements"; then
        echo "installing $2 into $dir"
        rm -rf "$dir"
        python3 -m venv "$dir"
        "$dir/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
        cp "$req" "$dir/.requirements"
    fi
}
venv validators "$D/requirements-validators.txt"
venv hcl "$D/requirements-hcl.txt"
VBIN="$TOOLS/validators/bin"
HCL_PY="$TOOLS/hcl/bin/python"
VAL_PY="$VBIN/python"

if [[ -z "${EGRESSD:-}" ]]; then
    TARGET_DIR="${CARGO_TARGET_DIR:-target}"
    [[ "$TARGET_DIR" == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
    EGRESSD="$TARGET_DIR/release/egressd"
    if [[ ! -x "$EGRESSD" ]]; then
        echo "building $EGRESSD"
        (cd "$ROOT" && cargo build --release --bin egressd)
    fi
fi
[[ -x "$EGRESSD" ]] || { echo "not an executable: $EGRESSD" >&2; exit 2; }

WORK="$(mktemp -d)"
EGRESSD_PID=""
cleanup() {
    if [[ -n "$EGRESSD_PID" ]]; then
        kill "$EGRESSD_PID" 2>/dev/null || true
        wait "$EGRESSD_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PASSED=0
FAILED=0
# check NAME COMMAND...: run COMMAND, output to a log shown only on failure.
check() {
    local name=$1 log
    shift
    log="$WORK/log.$((PASSED + FAILED))"
    if "$@" >"$log" 2>&1; then
        PASSED=$((PASSED + 1))
        echo "ok   - $name"
    else
        FAILED=$((FAILED + 1))
        echo "FAIL - $name"
        sed 's/^/    /' "$log"
    fi
}
# silent COMMAND...: succeed only if COMMAND succeeds and prints nothing (a finding is output).
silent() {
    local out rc=0
    out="$("$@" 2>&1)" || rc=$?
    [[ -n "$out" ]] && printf '%s\n' "$out"
    [[ $rc -eq 0 && -z "$out" ]]
}

# --- Dockerfile ---------------------------------------------------------------------------------
check "hadolint deploy/Dockerfile" "$VBIN/hadolint" --failure-threshold style "$D/Dockerfile"

# --- checkov ------------------------------------------------------------------------------------
CHECKOV=("$VBIN/checkov" --quiet --compact --skip-download)
export BC_SKIP_MAPPING=TRUE CHECKOV_RUN_SCA_PACKAGE_SCAN_V2=false
check "checkov terraform (deploy/aws/terraform)" "${CHECKOV[@]}" --framework terraform -d "$D/aws/terraform"
check "checkov kubernetes (deploy/kubernetes)" "${CHECKOV[@]}" --framework kubernetes -d "$D/kubernetes"
check "checkov dockerfile (deploy/Dockerfile)" "${CHECKOV[@]}" --framework dockerfile -f "$D/Dockerfile"

# --- Terraform: HCL parse, templates rendered as Terraform would --------------------------------
mapfile -t TF_FILES < <(find "$D" -name '*.tf' | sort)
check "python-hcl2 parses ${#TF_FILES[@]} .tf files" "$HCL_PY" "$D/checklib.py" hcl "${TF_FILES[@]}"

TF="$D/aws/terraform"
cat >"$WORK/toml-vars.json" <<'EOF'
{"max_connections": 20000, "dns_upstream": "10.64.0.2:53",
 "admin_clients": ["127.0.0.0/8", "::1/128", "10.64.0.0/26", "10.64.0.64/26", "10.64.0.128/26", "10.20.0.15/32"],
 "guard_allow": ["10.64.3.0/28"], "pac_proxy": "egressd-0123456789abcdef.elb.us-east-1.amazonaws.com:3128"}
EOF
mkdir -p "$WORK/appliance/rules.d/v1/lists"
cp config/allowlists/*.toml "$WORK/appliance/rules.d/v1/"
cp config/allowlists/lists/* "$WORK/appliance/rules.d/v1/lists/"
ln -s rules.d/v1 "$WORK/appliance/rules"
render_appliance_config() {
    python3 "$D/checklib.py" render "$TF/templates/egressd.toml.tftpl" "$WORK/toml-vars.json" "$WORK/appliance/egressd.toml" &&
        "$EGRESSD" check --config "$WORK/appliance/egressd.toml"
}
check "appliance config (templates/egressd.toml.tftpl) renders and passes egressd check" render_appliance_config

cat >"$WORK/userdata-vars.json" <<EOF
{"region": "us-east-1", "artifact_url": "s3://example-artifacts/egressd/egressd-0.1.0-aarch64",
 "egressd_sha256": "$(printf '%064d' 0)", "rules_source": "s3://example-rules/prod/",
 "egressd_toml": {"file": "$WORK/appliance/egressd.toml"},
 "egressd_service": {"file": "$D/systemd/egressd.service"},
 "sync_service": {"file": "$D/systemd/egressd-rules-sync.service"},
 "sync_timer": {"file": "$D/systemd/egressd-rules-sync.timer"},
 "sync_script": {"file": "$D/systemd/egressd-rules-sync"}}
EOF
render_user_data() {
    python3 "$D/checklib.py" render "$TF/templates/user-data.sh.tftpl" "$WORK/userdata-vars.json" "$WORK/user-data.sh" &&
        bash -n "$WORK/user-data.sh" &&
        shellcheck "$WORK/user-data.sh" &&
        # The script reaches the instance intact, and fits EC2's 16 KiB user-data limit gzipped.
        grep -qF "ExecReload=/bin/kill -HUP \$MAINPID" "$WORK/user-data.sh" &&
        [[ $(gzip -9c "$WORK/user-data.sh" | wc -c) -lt 16384 ]]
}
check "EC2 user-data (templates/user-data.sh.tftpl) renders, bash -n, shellcheck, < 16 KiB" render_user_data

cat >"$WORK/policy-vars.json" <<'EOF'
{"organization_id": "o-a1b2c3d4e5", "trusted_resource_accounts": ["111122223333"],
 "aws_owned_read_arns": ["arn:aws:s3:::prod-us-east-1-starport-layer-bucket/*"],
 "partition": "aws", "bucket": "example-org-data",
 "nat_eip_cidrs": ["198.51.100.10/32", "198.51.100.11/32", "198.51.100.12/32"],
 "vpc_endpoint_ids": ["vpce-0123456789abcdef0"]}
EOF
cat >"$WORK/policy-vars-min.json" <<'EOF'
{"organization_id": "o-a1b2c3d4e5", "trusted_resource_accounts": [], "aws_owned_read_arns": []}
EOF
render_policy() { # render_policy TEMPLATE VARS
    local out
    out="$WORK/$(basename "$1" .tftpl).$(basename "$2")"
    python3 "$D/checklib.py" render "$1" "$2" "$out" &&
        python3 -m json.tool "$out" >/dev/null &&
        python3 "$D/checklib.py" policy "$out" "$D/aws/policies/README.md"
}
for tpl in "$D"/aws/policies/*.json.tftpl; do
    check "IAM policy $(basename "$tpl") renders to valid JSON, every statement explained" render_policy "$tpl" "$WORK/policy-vars.json"
done
check "VPC endpoint policy with no optional statement is valid JSON" \
    render_policy "$D/aws/policies/vpc-endpoint-policy.json.tftpl" "$WORK/policy-vars-min.json"

# --- Prometheus ---------------------------------------------------------------------------------
check "promtool check rules alerts.yml" promtool check rules "$D/prometheus/alerts.yml"
check "promtool test rules alerts_test.yml" promtool test rules "$D/prometheus/alerts_test.yml"
check "promtool check config prometheus.yml prometheus-ec2.yml" \
    promtool check config "$D/prometheus/prometheus.yml" "$D/prometheus/prometheus-ec2.yml"

# --- systemd ------------------------------------------------------------------------------------
# systemd-analyze verify needs the units' dependencies and executables: a scratch root holding the
# host's system units, the units under test, and the binaries at the paths the units name.
verify_units() {
    local r="$WORK/sysroot"
    mkdir -p "$r/etc/systemd/system" "$r/usr/lib/systemd" "$r/usr/local/bin" "$r/usr/local/libexec/egressd" "$r/bin"
    cp -a /usr/lib/systemd/system "$r/usr/lib/systemd/"
    cp "$D"/systemd/*.service "$D"/systemd/*.timer "$r/etc/systemd/system/"
    cp "$EGRESSD" "$r/usr/local/bin/egressd"
    cp "$D/systemd/egressd-rules-sync" "$r/usr/local/libexec/egressd/"
    local k
    for k in /bin/kill /usr/bin/kill; do
        [[ -x "$k" ]] && { cp "$k" "$r/bin/kill"; break; }
    done
    silent systemd-analyze verify --root="$r" egressd.service egressd-rules-sync.service egressd-rules-sync.timer
}
check "systemd-analyze verify egressd.service egressd-rules-sync.{service,timer} (no output)" verify_units
security_units() {
    systemd-analyze security --offline=yes --root="$WORK/sysroot" --threshold=20 egressd.service | tail -n 1
}
check "systemd-analyze security egressd.service: exposure <= 2.0" security_units

# --- YAML, shell, JSON --------------------------------------------------------------------------
mapfile -t YAML_FILES < <(find "$D" \( -name '*.yaml' -o -name '*.yml' \) | sort)
check "yamllint (${#YAML_FILES[@]} files)" "$VBIN/yamllint" --strict -c "$D/.yamllint" "$D/.yamllint" "${YAML_FILES[@]}"

# Every shell script of the repository: *.sh and files with a sh/bash shebang. Templates (*.tftpl)
# are checked rendered, above.
shell_scripts() {
    local f
    { git ls-files --cached --others --exclude-standard 2>/dev/null || find . -type f -not -path './target/*' -not -path './.git/*'; } |
        while IFS= read -r f; do
            [[ -f "$f" ]] || continue
            case "$f" in
            *.tftpl | target/* | */target/*) continue ;;
            *.sh) echo "$f" ;;
            *) head -n 1 "$f" 2>/dev/null | grep -qE '^#!.*[/ ](ba)?sh( |$)' && echo "$f" ;;
            esac
        done | sort -u
}
mapfile -t SH_FILES < <(shell_scripts)
check "shellcheck (${#SH_FILES[@]} scripts: ${SH_FILES[*]})" shellcheck "${SH_FILES[@]}"
check "python3 -m json.tool deploy/grafana/egressd.json" python3 -m json.tool "$D/grafana/egressd.json"

# --- the configs the artefacts ship, checked by egressd itself ----------------------------------
IMG="$WORK/image/etc/egressd"
mkdir -p "$IMG/rules/lists"
cp "$D/config/egressd.toml" "$IMG/egressd.toml"
cp config/allowlists/00-deny.toml "$IMG/rules/00-deny.toml"
cp config/allowlists/lists/exfil-sites.txt "$IMG/rules/lists/exfil-sites.txt"
image_layout_matches() { # the layout above is what the Dockerfile copies
    grep -q '^COPY deploy/config/egressd.toml /etc/egressd/egressd.toml$' "$D/Dockerfile" &&
        grep -q '^COPY config/allowlists/00-deny.toml /etc/egressd/rules/00-deny.toml$' "$D/Dockerfile" &&
        grep -q '^COPY config/allowlists/lists/exfil-sites.txt /etc/egressd/rules/lists/exfil-sites.txt$' "$D/Dockerfile"
}
check "the image's /etc/egressd is what the Dockerfile copies" image_layout_matches
check "egressd check: the image config (deploy/config/egressd.toml + the image's rules)" "$EGRESSD" check --config "$IMG/egressd.toml"
compose_layout() { # the compose file's mounts give the same layout with the demo rules
    mkdir -p "$WORK/compose" && cp "$D/config/egressd.toml" "$WORK/compose/" &&
        cp -R config/allowlists "$WORK/compose/rules" &&
        "$EGRESSD" check --config "$WORK/compose/egressd.toml"
}
check "egressd check: the compose config (deploy/config + config/allowlists at /etc/egressd/rules)" compose_layout
k8s_config() {
    "$VAL_PY" "$D/checklib.py" configmap "$D/kubernetes/configmap.yaml" "$D/kubernetes/deployment.yaml" "$WORK/k8s" &&
        "$EGRESSD" check --config "$WORK/k8s/egressd.toml"
}
check "egressd check: the Kubernetes ConfigMap as mounted by the Deployment" k8s_config

# --- the image config run for real --------------------------------------------------------------
read -r PROXY_PORT DNS_PORT ADMIN_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
')
RUN="$WORK/run"
mkdir -p "$RUN/rules-good/lists" "$RUN/rules-bad"
sed -e "s/0\.0\.0\.0:3128/127.0.0.1:$PROXY_PORT/" -e "s/0\.0\.0\.0:8053/127.0.0.1:$DNS_PORT/" \
    -e "s/0\.0\.0\.0:9180/127.0.0.1:$ADMIN_PORT/" -e 's/upstreams = \["system"\]/upstreams = ["127.0.0.1:9"]/' \
    "$D/config/egressd.toml" >"$RUN/egressd.toml"
cp -R "$IMG/rules" "$RUN/rules-v1"
cp -R "$IMG/rules/." "$RUN/rules-good/"
cp config/allowlists/10-org.toml "$RUN/rules-good/"
cp -R "$RUN/rules-good/." "$RUN/rules-bad/"
printf '[[rule]]\nname = "broken"\nhosts = ["a..b"]\nport = 443\n' >"$RUN/rules-bad/90-broken.toml"

sync_rules() { # sync_rules SOURCE-DIR
    EGRESSD="$EGRESSD" EGRESSD_CONFIG_DIR="$RUN" EGRESSD_RULES_SOURCE="$1" "$D/systemd/egressd-rules-sync"
}
admin_get() { # admin_get PATH: the body, or a non-zero exit on a non-200 answer
    python3 - "http://127.0.0.1:$ADMIN_PORT$1" <<'PY'
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(sys.argv[1], timeout=5) as r:
    sys.stdout.write(r.read().decode())
PY
}
metric() { # metric NAME: its value in a fresh scrape
    admin_get /metrics | awk -v n="$1" '$1 == n { print $2 }'
}
wait_for() { # wait_for SECONDS COMMAND...: until COMMAND succeeds
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

first_sync() { sync_rules "$RUN/rules-v1" && [[ -L "$RUN/rules" ]]; }
check "egressd-rules-sync publishes the first rule set (rules -> rules.d/VERSION)" first_sync
"$EGRESSD" run --config "$RUN/egressd.toml" >"$RUN/egressd.log" 2>&1 &
EGRESSD_PID=$!
healthcheck() { # the Dockerfile's HEALTHCHECK command, with the host's busybox and the test port
    local args=()
    mapfile -t args < <(python3 "$D/checklib.py" healthcheck "$D/Dockerfile")
    [[ "${args[0]}" == /usr/local/bin/busybox ]] || return 1
    args[0]="$(command -v busybox)"
    args[${#args[@]} - 1]="${args[${#args[@]} - 1]/:9180\//:$ADMIN_PORT/}"
    "${args[@]}"
}
check "the Dockerfile's HEALTHCHECK (busybox wget /readyz) passes once egressd is up" wait_for 15 healthcheck
if ! kill -0 "$EGRESSD_PID" 2>/dev/null; then
    echo "egressd exited; its output:"
    cat "$RUN/egressd.log"
fi
# One proxy request and one DNS query, both denied, so that the labelled counters have series.
python3 - "$PROXY_PORT" "$DNS_PORT" <<'PY' || true
import socket, struct, sys
proxy, dns = int(sys.argv[1]), int(sys.argv[2])
with socket.create_connection(("127.0.0.1", proxy), timeout=5) as s:
    s.sendall(b"GET http://denied.example/ HTTP/1.1\r\nHost: denied.example\r\nConnection: close\r\n\r\n")
    s.recv(4096)
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(l)]) + l.encode() for l in "denied.example".split(".")) + b"\0" + struct.pack(">HH", 1, 1)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
    u.settimeout(5)
    u.sendto(q, ("127.0.0.1", dns))
    u.recv(4096)
PY
admin_get /metrics >"$RUN/scrape.txt" || true
check "every metric name in alerts.yml and the dashboard is exported by egressd" \
    python3 "$D/checklib.py" metric-names "$RUN/scrape.txt" "$D/prometheus/alerts.yml" "$D/grafana/egressd.json"

gen1="$(metric egressd_config_generation || true)"
rules1="$(metric egressd_policy_rules || true)"
reloaded() { [[ "$(metric egressd_config_generation)" -gt "${gen1:-0}" && "$(metric egressd_policy_rules)" -gt "${rules1:-0}" ]]; }
swap_good() { sync_rules "$RUN/rules-good" && wait_for 10 reloaded; }
check "a new rule set is swapped in and egressd hot-reloads it (generation ${gen1:-?} -> higher, more rules)" swap_good
gen2="$(metric egressd_config_generation || true)"
link2="$(readlink "$RUN/rules" || true)"
refuse_bad() {
    if sync_rules "$RUN/rules-bad"; then
        echo "the sync accepted an invalid rule set"
        return 1
    fi
    sleep 1
    [[ "$(readlink "$RUN/rules")" == "$link2" && "$(metric egressd_config_generation)" == "$gen2" ]]
}
check "an invalid rule set is refused by egressd check: link and policy unchanged" refuse_bad
stop_gracefully() { # SIGTERM: /readyz turns 503 and the process exits 0
    kill -TERM "$EGRESSD_PID"
    local rc=0
    wait "$EGRESSD_PID" || rc=$?
    EGRESSD_PID=""
    [[ $rc -eq 0 ]]
}
check "SIGTERM stops egressd cleanly (exit 0)" stop_gracefully

echo "$PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
