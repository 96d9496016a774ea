#!/usr/bin/env bash
# The forward proxy driven by a real client (curl), end to end, on loopback only:
#   HTTP origin  python3 -m http.server on 127.0.0.1
#   TLS origin   a tiny python3 ssl server on 127.0.0.1 with an openssl self-signed certificate
#   egressd run  with a scratch config whose [hosts] map every test name to 127.0.0.1
# Nothing here contacts a non-loopback address: every name is resolved by egressd's [hosts] and
# curl reaches it only through the proxy.
#
# Usage: tests/clients/proxy.sh            (EGRESSD=path/to/egressd to test another build)
set -euo pipefail

unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY ftp_proxy FTP_PROXY
export no_proxy="" NO_PROXY=""

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -z "${EGRESSD:-}" ]]; then
    EGRESSD="$ROOT/target/release/egressd"
    if [[ ! -x "$EGRESSD" ]]; then
        echo "building $EGRESSD"
        (cd "$ROOT" && cargo build --release --bin egressd)
    fi
fi
if [[ ! -x "$EGRESSD" ]]; then
    echo "not an executable: $EGRESSD" >&2
    exit 2
fi

for tool in curl openssl python3; do
    command -v "$tool" >/dev/null || { echo "missing tool: $tool" >&2; exit 2; }
done

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
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PASSED=0
FAILED=0
pass() { PASSED=$((PASSED + 1)); echo "ok   - $1"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL - $1"; }

# Five distinct free loopback ports, held together while chosen so they differ.
read -r HTTP_PORT TLS_PORT PROXY_PORT DNS_PORT ADMIN_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
')

# --- origins ------------------------------------------------------------------------------------
mkdir -p "$WORK/www" "$WORK/rules"
printf 'hello from origin\n' >"$WORK/www/index.html"
python3 -m http.server --bind 127.0.0.1 --directory "$WORK/www" "$HTTP_PORT" >"$WORK/http.log" 2>&1 &
PIDS+=("$!")

openssl req -x509 -newkey rsa:2048 -nodes -days 1 \
    -subj /CN=tls.allowed.test -addext subjectAltName=DNS:tls.allowed.test \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" >/dev/null 2>&1

cat >"$WORK/tls_origin.py" <<'PY'
import http.server, ssl, sys

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello over tls\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

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
cat >"$WORK/egressd.toml" <<EOF
[proxy]
listen = ["127.0.0.1:$PROXY_PORT"]
connect_timeout = "2s"
header_timeout = "2s"

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
"allowed.test" = ["127.0.0.1"]
"tls.allowed.test" = ["127.0.0.1"]
"denied.test" = ["127.0.0.1"]
EOF
cat >"$WORK/rules/test.toml" <<EOF
[[rule]]
name = "curl-test"
hosts = ["allowed.test", "tls.allowed.test"]
ports = [$HTTP_PORT, $TLS_PORT]
EOF

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
    if ! kill -0 "$EGRESSD_PID" 2>/dev/null; then
        break
    fi
    sleep 0.05
done
if [[ $started -ne 1 ]]; then
    echo "egressd did not start; its output:" >&2
    cat "$WORK/egressd.log" >&2
    exit 1
fi
for port in "$PROXY_PORT" "$HTTP_PORT" "$TLS_PORT"; do
    wait_port "$port" || { echo "nothing listening on 127.0.0.1:$port" >&2; exit 1; }
done

PROXY="http://127.0.0.1:$PROXY_PORT"
CURL=(curl --silent --show-error --max-time 10 --proxy "$PROXY")

# --- checks -------------------------------------------------------------------------------------
# 1. allowed plain HTTP
out="$WORK/out1"
if code=$("${CURL[@]}" -o "$out" -w '%{http_code}' "http://allowed.test:$HTTP_PORT/") &&
    [[ $code == 200 ]] && grep -q 'hello from origin' "$out"; then
    pass "GET http://allowed.test via the proxy -> 200 with the origin's body"
else
    fail "GET http://allowed.test via the proxy (code ${code:-none})"
fi

# 2. allowed HTTPS through CONNECT, certificate verified against the test CA
out="$WORK/out2"
if "${CURL[@]}" --cacert "$WORK/cert.pem" -o "$out" "https://tls.allowed.test:$TLS_PORT/" &&
    grep -q 'hello over tls' "$out"; then
    pass "GET https://tls.allowed.test via CONNECT -> TLS verified, body intact"
else
    fail "GET https://tls.allowed.test via CONNECT"
fi

# 3. denied plain HTTP -> 403
code=$("${CURL[@]}" -o /dev/null -w '%{http_code}' "http://denied.test:$HTTP_PORT/" || true)
if [[ $code == 403 ]]; then
    pass "GET http://denied.test -> 403"
else
    fail "GET http://denied.test -> expected 403, got ${code:-none}"
fi

# 4. the denial names itself
headers=$("${CURL[@]}" -I "http://denied.test:$HTTP_PORT/" || true)
if grep -qi '^x-egressd-deny: *rule=default; *reason=default; *id=' <<<"$headers"; then
    pass "denied response carries X-Egressd-Deny"
else
    fail "denied response lacks X-Egressd-Deny: $(tr -d '\r' <<<"$headers" | tr '\n' '|')"
fi

# 5. denied HTTPS: the CONNECT is refused, curl fails
rc=0
"${CURL[@]}" --cacert "$WORK/cert.pem" -o /dev/null "https://denied.test:$TLS_PORT/" 2>"$WORK/err5" || rc=$?
if [[ $rc -ne 0 ]]; then
    pass "GET https://denied.test -> CONNECT refused (curl exit $rc)"
else
    fail "GET https://denied.test succeeded through the proxy"
fi

# 6. an allowed name on a port no rule lists
code=$("${CURL[@]}" -o /dev/null -w '%{http_code}' "http://allowed.test:$ADMIN_PORT/" || true)
if [[ $code == 403 ]]; then
    pass "GET http://allowed.test on an unlisted port -> 403"
else
    fail "GET http://allowed.test on an unlisted port -> expected 403, got ${code:-none}"
fi

# 7. the audit log recorded the decisions
sleep 0.3
if grep '"message":"decision"' "$WORK/egressd.log" | grep -q '"action":"allow"' &&
    grep '"message":"decision"' "$WORK/egressd.log" | grep '"host":"denied.test"' | grep -q '"action":"deny"'; then
    pass "audit log has allow and deny decision lines"
else
    fail "audit log lacks decision lines; egressd output follows"
    cat "$WORK/egressd.log"
fi

echo "$PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
