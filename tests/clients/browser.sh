#!/usr/bin/env bash
# A real browser through egressd: headless Debian Chromium, end to end, on loopback only.
#   TLS origin   a tiny python3 ssl server on 127.0.0.1 with an openssl-made certificate; Chromium
#                trusts it through --ignore-certificate-errors-spki-list (the SHA-256 of the
#                certificate's public key, computed with openssl), which Chromium honours only
#                with an explicit --user-data-dir: exactly this key is trusted, nothing else
#   egressd run  with a scratch config whose [hosts] map the test names to 127.0.0.1, a guard hole
#                for 127.0.0.0/8 and one rule allowing only tls.allowed.test on the origin's port
#   Chromium     once with --proxy-server, once with --proxy-pac-url (egressd's /proxy.pac); each
#                run loads the allowed page (its text must be in the dumped DOM) and the denied one
#                (its text must not be, and egressd must have logged the CONNECT as denied)
# Nothing here contacts a non-loopback address: the proxy is set for every request
# (--proxy-bypass-list='<-loopback>' removes Chromium's implicit loopback bypass too), Chromium never
# resolves a name itself, and egressd denies every name but the test origin's. As root the whole
# test also runs in a private network namespace whose only interface is loopback.
#
# Usage: tests/clients/browser.sh      (EGRESSD=path/to/egressd to test another build;
#                                       CHROMIUM=path/to/chromium to use another browser;
#                                       KEEP_WORK=1 keeps the scratch directory for a post-mortem)
# As root with CI=true, missing Debian packages (chromium, openssl, python3) are installed.
set -euo pipefail

unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY ftp_proxy FTP_PROXY
export no_proxy="" NO_PROXY=""

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# --- tools --------------------------------------------------------------------------------------
CHROMIUM="${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}"
need_pkgs=()
[[ -n "$CHROMIUM" ]] || need_pkgs+=(chromium)
command -v openssl >/dev/null || need_pkgs+=(openssl)
command -v python3 >/dev/null || need_pkgs+=(python3)
if ((${#need_pkgs[@]} > 0)); then
    if [[ "${CI:-}" == "true" && "$(id -u)" == "0" ]]; then
        echo "installing: ${need_pkgs[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
        CHROMIUM="${CHROMIUM:-$(command -v chromium || true)}"
    else
        echo "missing: ${need_pkgs[*]} (apt-get install ${need_pkgs[*]}, or run as root with CI=true)" >&2
        exit 2
    fi
fi
[[ -x "$CHROMIUM" ]] || { echo "not an executable: $CHROMIUM" >&2; exit 2; }

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
export EGRESSD CHROMIUM

# Isolation: as root, the test re-runs itself in a fresh network namespace holding only a
# loopback interface, so nothing it starts can reach any other address whatever Chromium tries.
# EGRESSD_BROWSER_NETNS=0 skips this (the proxy settings still send every request to egressd).
if [[ -z "${EGRESSD_BROWSER_IN_NETNS:-}" && "${EGRESSD_BROWSER_NETNS:-1}" != 0 && "$(id -u)" == 0 ]] &&
    command -v unshare >/dev/null && command -v ip >/dev/null && unshare --net true 2>/dev/null; then
    # shellcheck disable=SC2016 # $0 and $@ expand in the inner shell
    exec unshare --net env EGRESSD_BROWSER_IN_NETNS=1 bash -c 'ip link set lo up && exec bash "$0" "$@"' "${BASH_SOURCE[0]}" "$@"
fi
if [[ -n "${EGRESSD_BROWSER_IN_NETNS:-}" ]]; then
    echo "running in a private network namespace: $(ip -o link show | awk -F': ' '{print $2}' | tr '\n' ' ')"
fi

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n "${KEEP_WORK:-}" ]]; then
        echo "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PASSED=0
FAILED=0
pass() { PASSED=$((PASSED + 1)); echo "ok   - $1"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL - $1"; }

# Four distinct free loopback ports, held together while chosen so they differ.
read -r TLS_PORT PROXY_PORT DNS_PORT ADMIN_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
')

# --- TLS origin ---------------------------------------------------------------------------------
# One certificate for both names: the denied name must fail at egressd, not at certificate checks.
openssl req -x509 -newkey rsa:2048 -nodes -days 1 \
    -subj /CN=tls.allowed.test -addext subjectAltName=DNS:tls.allowed.test,DNS:tls.denied.test \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" >/dev/null 2>&1
SPKI="$(openssl x509 -in "$WORK/cert.pem" -noout -pubkey |
    openssl pkey -pubin -outform der |
    openssl dgst -sha256 -binary |
    openssl base64 -A)"

cat >"$WORK/tls_origin.py" <<'PY'
import http.server, ssl, sys

PAGE = b"""<!doctype html>
<html><head><title>egressd browser test</title></head>
<body><p id="marker">hello from the allowed origin</p></body></html>
"""

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/favicon.ico":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s\n" % (self.headers.get("Host", "-"), fmt % args))

port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
httpd.serve_forever()
PY
python3 "$WORK/tls_origin.py" "$TLS_PORT" "$WORK/cert.pem" "$WORK/key.pem" >"$WORK/tls.log" 2>&1 &
PIDS+=("$!")

# --- egressd ------------------------------------------------------------------------------------
mkdir -p "$WORK/rules"
cat >"$WORK/egressd.toml" <<EOF
[proxy]
listen = ["127.0.0.1:$PROXY_PORT"]
connect_timeout = "2s"
header_timeout = "5s"

[dns]
listen = ["127.0.0.1:$DNS_PORT"]
upstreams = ["127.0.0.1:9"]

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[guard]
allow_cidrs = ["127.0.0.0/8"]

[policy]
files = ["rules/*.toml"]

[hosts]
"tls.allowed.test" = ["127.0.0.1"]
"tls.denied.test" = ["127.0.0.1"]
EOF
cat >"$WORK/rules/browser.toml" <<EOF
[[rule]]
name = "browser-test"
hosts = ["tls.allowed.test"]
ports = [$TLS_PORT]
EOF

"$EGRESSD" check --config "$WORK/egressd.toml" >"$WORK/check.log" 2>&1 ||
    { echo "egressd check failed:" >&2; cat "$WORK/check.log" >&2; exit 1; }

"$EGRESSD" run --config "$WORK/egressd.toml" >"$WORK/egressd.log" 2>&1 &
EGRESSD_PID=$!
PIDS+=("$EGRESSD_PID")

wait_port() { # wait_port PORT: until something accepts on 127.0.0.1:PORT (≤ 10 s)
    python3 - "$1" <<'PY'
import socket, sys, time
deadline = time.time() + 10
while time.time() < deadline:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=0.5).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit(1)
PY
}

started=0
for _ in $(seq 1 200); do
    if grep -q '"event":"start"' "$WORK/egressd.log" 2>/dev/null; then
        started=1
        break
    fi
    kill -0 "$EGRESSD_PID" 2>/dev/null || break
    sleep 0.05
done
if [[ $started -ne 1 ]]; then
    echo "egressd did not start; its output:" >&2
    cat "$WORK/egressd.log" >&2
    exit 1
fi
for port in "$PROXY_PORT" "$ADMIN_PORT" "$TLS_PORT"; do
    wait_port "$port" || { echo "nothing listening on 127.0.0.1:$port" >&2; exit 1; }
done

# --- chromium -----------------------------------------------------------------------------------
ALLOWED_URL="https://tls.allowed.test:$TLS_PORT/"
DENIED_URL="https://tls.denied.test:$TLS_PORT/"
DENIED_HTTP_URL="http://tls.denied.test:$TLS_PORT/"
PAGE_TEXT="hello from the allowed origin"
PAC_URL="http://127.0.0.1:$ADMIN_PORT/proxy.pac"

# browse NAME URL PROXY-FLAG...: one headless Chromium run with a fresh profile; the dumped DOM
# goes to $WORK/NAME.dom, Chromium's own output to $WORK/NAME.log, and MARK is set to the audit
# log's length before the run. Returns Chromium's exit code.
MARK=0
browse() {
    local name=$1 url=$2
    shift 2
    local profile rc=0
    profile="$(mktemp -d "$WORK/profile.XXXXXX")"
    MARK=$(wc -l <"$WORK/egressd.log")
    timeout 60 "$CHROMIUM" \
        --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --disable-default-apps --disable-extensions --no-default-browser-check \
        --disable-breakpad --disable-dev-shm-usage --password-store=basic --use-mock-keychain \
        --user-data-dir="$profile" \
        --ignore-certificate-errors-spki-list="$SPKI" \
        "$@" \
        --proxy-bypass-list='<-loopback>' \
        --virtual-time-budget=5000 --timeout=20000 \
        --dump-dom "$url" >"$WORK/$name.dom" 2>"$WORK/$name.log" || rc=$?
    return "$rc"
}

# log_has HOST ACTION: egressd logged a CONNECT decision for HOST with ACTION since the last
# browse started.
log_has() {
    tail -n +"$((MARK + 1))" "$WORK/egressd.log" | grep '"message":"decision"' | grep '"kind":"connect"' |
        grep "\"host\":\"$1\"" | grep -q "\"action\":\"$2\""
}

# allowed NAME PROXY-FLAG...: the allowed page loads through egressd.
allowed() {
    local name=$1
    shift
    local rc=0
    browse "$name" "$ALLOWED_URL" "$@" || rc=$?
    sleep 0.2
    if [[ $rc -eq 0 ]] && grep -q "$PAGE_TEXT" "$WORK/$name.dom" && log_has tls.allowed.test allow; then
        pass "$name: $ALLOWED_URL loads through egressd (page text in the DOM, CONNECT allowed in the audit log)"
    else
        fail "$name: $ALLOWED_URL (chromium exit $rc)"
        diagnose "$name"
    fi
}

# denied NAME PROXY-FLAG...: the denied page does not load, and egressd is the one that refused.
denied() {
    local name=$1
    shift
    local rc=0
    browse "$name" "$DENIED_URL" "$@" || rc=$?
    sleep 0.2
    if [[ $rc -eq 124 ]]; then
        fail "$name: chromium timed out"
        diagnose "$name"
    elif grep -q "$PAGE_TEXT" "$WORK/$name.dom"; then
        fail "$name: $DENIED_URL loaded the origin's page through egressd"
        diagnose "$name"
    elif ! grep -q 'ERR_TUNNEL_CONNECTION_FAILED' "$WORK/$name.dom" "$WORK/$name.log"; then
        fail "$name: Chromium did not report ERR_TUNNEL_CONNECTION_FAILED (the proxy's refusal)"
        diagnose "$name"
    elif ! log_has tls.denied.test deny; then
        fail "$name: no CONNECT deny for tls.denied.test in the audit log"
        diagnose "$name"
    else
        pass "$name: $DENIED_URL refused by egressd (no page text, ERR_TUNNEL_CONNECTION_FAILED, CONNECT denied in the audit log)"
    fi
}

# denied_http NAME PROXY-FLAG...: a denied plain-HTTP page shows egressd's 403 text to the user.
denied_http() {
    local name=$1
    shift
    local rc=0
    browse "$name" "$DENIED_HTTP_URL" "$@" || rc=$?
    if [[ $rc -eq 0 ]] && grep -q 'egressd: request denied (rule=default; reason=default; id=' "$WORK/$name.dom"; then
        pass "$name: $DENIED_HTTP_URL shows egressd's 403 page"
    else
        fail "$name: $DENIED_HTTP_URL did not show egressd's 403 page (chromium exit $rc)"
        diagnose "$name"
    fi
}

diagnose() {
    echo "  --- $1.dom (first 20 lines)"
    head -n 20 "$WORK/$1.dom" | sed 's/^/  /'
    echo "  --- $1.log (last 20 lines)"
    tail -n 20 "$WORK/$1.log" | sed 's/^/  /'
    echo "  --- egressd decisions"
    grep '"message":"decision"' "$WORK/egressd.log" | tail -n 10 | sed 's/^/  /'
}

# 1. the PAC file names this proxy and never DIRECT
pac="$(python3 - "$PAC_URL" <<'PY'
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
print(opener.open(sys.argv[1], timeout=5).read().decode())
PY
)" || pac=""
if grep -q "PROXY 127.0.0.1:$PROXY_PORT" <<<"$pac" && ! grep -q DIRECT <<<"$pac"; then
    pass "/proxy.pac returns PROXY 127.0.0.1:$PROXY_PORT and no DIRECT"
else
    fail "/proxy.pac: ${pac:-no answer}"
fi

# 2-4. explicit proxy
allowed "proxy-server-allowed" --proxy-server="http://127.0.0.1:$PROXY_PORT"
denied "proxy-server-denied" --proxy-server="http://127.0.0.1:$PROXY_PORT"
denied_http "proxy-server-denied-http" --proxy-server="http://127.0.0.1:$PROXY_PORT"

# 5-7. the same through the PAC file
allowed "proxy-pac-allowed" --proxy-pac-url="$PAC_URL"
denied "proxy-pac-denied" --proxy-pac-url="$PAC_URL"
denied_http "proxy-pac-denied-http" --proxy-pac-url="$PAC_URL"

# 8. nothing but the test names reached egressd's allow path, and the origin saw only the allowed name
if grep '"message":"decision"' "$WORK/egressd.log" | grep '"action":"allow"' | grep -vq '"host":"tls.allowed.test"'; then
    fail "egressd allowed something other than tls.allowed.test:"
    grep '"message":"decision"' "$WORK/egressd.log" | grep '"action":"allow"' | grep -v '"host":"tls.allowed.test"' | head -n 5
elif grep -q 'tls.denied.test' "$WORK/tls.log"; then
    fail "the origin served a request for tls.denied.test"
else
    pass "only tls.allowed.test was allowed; the origin never saw tls.denied.test"
fi

echo "$PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
