#!/usr/bin/env bash
# The DNS firewall driven by a real client (dig), end to end, on loopback only:
#   upstream     a tiny python3 UDP+TCP DNS server on 127.0.0.1 (answers hand-encoded with
#                struct: A 93.184.216.34 for allowed.test and every name below it, NXDOMAIN for
#                everything else); it logs every query it receives
#   egressd run  with a scratch config: [dns] on a free loopback port, that upstream, a
#                [hosts] entry, and a rule allowing allowed.test and *.allowed.test
# Every dig call names @127.0.0.1 explicitly; nothing here contacts a non-loopback address.
#
# Usage: tests/clients/dns.sh            (EGRESSD=path/to/egressd to test another build)
# Needs: dig (Debian/Ubuntu package bind9-dnsutils), python3.
set -euo pipefail

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
EGRESSD="$(cd "$(dirname "$EGRESSD")" && pwd)/$(basename "$EGRESSD")"

for tool in dig python3; do
    command -v "$tool" >/dev/null || { echo "missing tool: $tool (dig is in bind9-dnsutils)" >&2; exit 2; }
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
fail() {
    FAILED=$((FAILED + 1))
    echo "FAIL - $1"
    if [[ -n "${2:-}" ]]; then
        local line
        while IFS= read -r line; do
            echo "       | $line"
        done <<<"$2"
    fi
}

# Four distinct free loopback ports (TCP and UDP both free), held together while chosen.
read -r UP_PORT DNS_PORT PROXY_PORT ADMIN_PORT < <(python3 -c '
import socket
ports, held = [], []
while len(ports) < 4:
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t.bind(("127.0.0.1", 0))
    port = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", port))
    except OSError:
        t.close()
        continue
    held += [t, u]
    ports.append(port)
print(" ".join(map(str, ports)))
')

# --- upstream -----------------------------------------------------------------------------------
cat >"$WORK/upstream.py" <<'PY'
import socket, socketserver, struct, sys, threading

PORT, LOG = int(sys.argv[1]), sys.argv[2]
ADDR = socket.inet_aton("93.184.216.34")
lock = threading.Lock()

def log(line):
    with lock, open(LOG, "a") as f:
        f.write(line + "\n")

def parse(data):
    """(id, flags, name, question bytes, qtype) of a one-question query, or None."""
    if len(data) < 12:
        return None
    qid, flags, qd = struct.unpack(">HHH", data[:6])
    if qd != 1 or flags & 0x8000:
        return None
    i, labels = 12, []
    while True:
        if i >= len(data):
            return None
        n = data[i]
        if n == 0:
            i += 1
            break
        if n > 63 or i + 1 + n > len(data):
            return None
        labels.append(data[i + 1:i + 1 + n])
        i += 1 + n
    if i + 4 > len(data):
        return None
    qtype, _qclass = struct.unpack(">HH", data[i:i + 4])
    name = b".".join(labels).decode("ascii", "replace").lower()
    return qid, flags, name, data[12:i + 4], qtype

def answer(data):
    p = parse(data)
    if p is None:
        return None
    qid, flags, name, question, qtype = p
    log("%s %d" % (name, qtype))
    base = 0x8000 | 0x0400 | 0x0080 | (flags & 0x0100)  # QR AA RA, RD copied
    if not (name == "allowed.test" or name.endswith(".allowed.test")):
        return struct.pack(">HHHHHH", qid, base | 3, 1, 0, 0, 0) + question  # NXDOMAIN
    if qtype != 1:
        return struct.pack(">HHHHHH", qid, base, 1, 0, 0, 0) + question  # NODATA
    rr = struct.pack(">HHHIH", 0xC00C, 1, 1, 300, 4) + ADDR
    return struct.pack(">HHHHHH", qid, base, 1, 1, 0, 0) + question + rr

class Udp(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        out = answer(data)
        if out is not None:
            sock.sendto(out, self.client_address)

class Tcp(socketserver.BaseRequestHandler):
    def handle(self):
        f = self.request.makefile("rb")
        while True:
            head = f.read(2)
            if len(head) < 2:
                return
            data = f.read(struct.unpack(">H", head)[0])
            out = answer(data)
            if out is not None:
                self.request.sendall(struct.pack(">H", len(out)) + out)

class UdpServer(socketserver.ThreadingMixIn, socketserver.UDPServer):
    daemon_threads = True

class TcpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True

udp = UdpServer(("127.0.0.1", PORT), Udp)
tcp = TcpServer(("127.0.0.1", PORT), Tcp)
threading.Thread(target=udp.serve_forever, daemon=True).start()
log("ready")
tcp.serve_forever()
PY
: >"$WORK/upstream.log"
python3 "$WORK/upstream.py" "$UP_PORT" "$WORK/upstream.log" 2>"$WORK/upstream.err" &
PIDS+=("$!")

# --- egressd ------------------------------------------------------------------------------------
mkdir -p "$WORK/rules"
cat >"$WORK/egressd.toml" <<EOF
[proxy]
listen = ["127.0.0.1:$PROXY_PORT"]

[dns]
listen = ["127.0.0.1:$DNS_PORT"]
upstreams = ["127.0.0.1:$UP_PORT"]
upstream_timeout = "2s"

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[guard]
allow_cidrs = ["127.0.0.0/8"]

[policy]
files = ["rules/*.toml"]

[hosts]
"static.allowed.test" = ["127.0.0.1"]
EOF
cat >"$WORK/rules/test.toml" <<'EOF'
[[rule]]
name = "dns-allowed"
hosts = ["allowed.test", "*.allowed.test"]
EOF

(cd "$WORK" && exec "$EGRESSD" run --config "$WORK/egressd.toml") >"$WORK/egressd.log" 2>&1 &
EGRESSD_PID=$!
PIDS+=("$EGRESSD_PID")

ready=0
for _ in $(seq 1 100); do
    if grep -q '"event":"start"' "$WORK/egressd.log" 2>/dev/null && grep -q '^ready$' "$WORK/upstream.log"; then
        ready=1
        break
    fi
    if ! kill -0 "$EGRESSD_PID" 2>/dev/null; then
        break
    fi
    sleep 0.1
done
if [[ "$ready" != 1 ]]; then
    echo "egressd or the upstream did not start; egressd output:" >&2
    cat "$WORK/egressd.log" >&2
    cat "$WORK/upstream.err" >&2
    exit 1
fi

q() {
    dig @127.0.0.1 -p "$DNS_PORT" +time=2 +tries=1 "$@" 2>&1 || true
}

upstream_saw() {
    grep -qiF -- "$1 " "$WORK/upstream.log"
}

# --- checks -------------------------------------------------------------------------------------
out="$(q www.allowed.test A +short)"
if [[ "$out" == "93.184.216.34" ]]; then pass "allowed name over UDP: $out"; else fail "allowed name over UDP" "$out"; fi

out="$(q www.allowed.test A +short +tcp)"
if [[ "$out" == "93.184.216.34" ]]; then pass "allowed name over TCP: $out"; else fail "allowed name over TCP" "$out"; fi

out="$(q static.allowed.test A)"
if grep -q 'status: NOERROR' <<<"$out" && grep -qE 'flags:.* aa[ ;]' <<<"$out" \
    && grep -qE '^static\.allowed\.test\.[[:space:]].*A[[:space:]]+127\.0\.0\.1$' <<<"$out" \
    && ! upstream_saw static.allowed.test; then
    pass "[hosts] name answered authoritatively (aa) without the upstream"
else
    fail "[hosts] name answered authoritatively (aa) without the upstream" "$out"
fi

out="$(q unlisted.test A)"
if grep -q 'status: NXDOMAIN' <<<"$out" && grep -q 'EDE: 15 (Blocked)' <<<"$out" \
    && grep -q 'rule=default; reason=default' <<<"$out" && ! upstream_saw unlisted.test; then
    pass "unlisted name: NXDOMAIN with EDE 15 (Blocked), never forwarded"
else
    fail "unlisted name: NXDOMAIN with EDE 15 (Blocked), never forwarded" "$out"
fi

out="$(q unlisted.test A +tcp)"
if grep -q 'status: NXDOMAIN' <<<"$out" && grep -q 'EDE: 15 (Blocked)' <<<"$out"; then
    pass "unlisted name over TCP: NXDOMAIN with EDE 15"
else
    fail "unlisted name over TCP: NXDOMAIN with EDE 15" "$out"
fi

out="$(q txt.allowed.test TXT)"
if grep -q 'status: NXDOMAIN' <<<"$out" && grep -q 'EDE: 15 (Blocked)' <<<"$out" \
    && grep -q 'reason=qtype' <<<"$out" && ! upstream_saw txt.allowed.test; then
    pass "TXT for an allowed name: blocked (reason=qtype), never forwarded"
else
    fail "TXT for an allowed name: blocked (reason=qtype), never forwarded" "$out"
fi

LONG="$(python3 -c '
import random
a = "abcdefghijklmnopqrstuvwxyz234567"
print(".".join("".join(random.choice(a) for _ in range(50)) for _ in range(4)) + ".allowed.test")
')"
out="$(q "$LONG" A)"
if grep -q 'status: NXDOMAIN' <<<"$out" && grep -q 'reason=tunneling' <<<"$out" && ! upstream_saw "$LONG"; then
    pass "${#LONG}-character tunnel-like name: NXDOMAIN (reason=tunneling), never forwarded"
else
    fail "${#LONG}-character tunnel-like name: NXDOMAIN (reason=tunneling), never forwarded" "$out"
fi

out="$(q version.bind TXT -c CH)"
if grep -q 'status: REFUSED' <<<"$out" && ! grep -qiE '^version\.bind\..*TXT' <<<"$out"; then
    pass "CH TXT version.bind: REFUSED, no version text"
else
    fail "CH TXT version.bind: REFUSED, no version text" "$out"
fi

if grep '"message":"decision"' "$WORK/egressd.log" | grep '"kind":"dns"' | grep '"host":"unlisted.test"' \
    | grep '"qtype":"A"' | grep -q '"reason":"default"'; then
    pass "audit line for the blocked query (kind=dns, host, qtype, reason)"
else
    fail "audit line for the blocked query (kind=dns, host, qtype, reason)" "$(tail -n 20 "$WORK/egressd.log")"
fi

if kill -0 "$EGRESSD_PID" 2>/dev/null; then pass "egressd still running"; else fail "egressd still running" "$(tail -n 20 "$WORK/egressd.log")"; fi

echo "$PASSED passed, $FAILED failed"
[[ "$FAILED" == 0 ]]
