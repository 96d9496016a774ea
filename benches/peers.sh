#!/usr/bin/env bash
# egressd against real peers, in one run, on loopback only:
#   proxies  egressd, Squid, tinyproxy            (and "direct": no proxy at all, the limit)
#   DNS      egressd, dnsdist, Unbound            (and the upstream alone, the no-firewall baseline)
# Every system gets the same policy: 100 exact names and 100 "name and everything below"
# suffixes allowed, everything else denied; the proxies allow the same origin ports.
#
# Layout: the system under test (SUT) runs pinned to one core (SUT_CPU, default 0); the load
# generator, the origins and the DNS upstream share the other (GEN_CPU, default 1). Each
# measurement is repeated RUNS times (default 3) and the median is reported, with the SUT's
# CPU time per operation (utime+stime of its process tree, from /proc/PID/stat, over exactly
# the measured window) next to the rate. Every system logs at its normal production level:
# egressd's JSON audit line per decision, Squid's access.log (via its log daemon), tinyproxy at
# LogLevel Info; dnsdist and Unbound at their defaults (no per-query log).
#
# Usage:   benches/peers.sh                    (or: cargo bench --bench peers)
# Env:     RUNS=3 SECS=3 SUT_CPU=0 GEN_CPU=1 NICE=0 ONLY=proxy,dns,reload  OUT=target/peers-results.md  KEEP=1
#          EGRESSD=path (default target/release/egressd)  PEERS_BIN=path (the load generator)
# Needs:   apt-get install -y squid tinyproxy dnsdist unbound dnsperf wrk
#          (plus util-linux for taskset/unshare). It installs nothing itself.
# Nothing here contacts a non-loopback address. Takes about 12 minutes on 2 cores.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNS="${RUNS:-3}"
SECS="${SECS:-3}"
SUT_CPU="${SUT_CPU:-0}"
GEN_CPU="${GEN_CPU:-1}"
NICE="${NICE:-0}"
ONLY="${ONLY:-proxy,dns,reload}"
OUT="${OUT:-$ROOT/target/peers-results.md}"
# The fixed rates of the latency runs.
TUNNEL_RATE=1000
DNS_RATE=20000
RELOAD_RATE=2000

unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY
export no_proxy="" NO_PROXY=""

missing=()
for tool in squid tinyproxy dnsdist unbound dnsperf wrk taskset unshare; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "missing: ${missing[*]}" >&2
    echo "install with: apt-get update && apt-get install -y squid tinyproxy dnsdist unbound dnsperf wrk" >&2
    exit 2
fi

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
T_START=$(date +%s)

# --- binaries -----------------------------------------------------------------------------------
if [[ -z "${EGRESSD:-}" ]]; then
    EGRESSD="$ROOT/target/release/egressd"
    log "building egressd (cargo build --release)"
    (cd "$ROOT" && cargo build --release --bin egressd >&2)
fi
if [[ -z "${PEERS_BIN:-}" ]]; then
    log "building the load generator (cargo bench --bench peers --no-run)"
    PEERS_BIN=$(cd "$ROOT" && cargo bench --bench peers --no-run --message-format=json 2>/dev/null |
        grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | grep '/peers-' | tail -1)
fi
for bin in "$EGRESSD" "$PEERS_BIN"; do
    [[ -x "$bin" ]] || { echo "not an executable: '$bin'" >&2; exit 2; }
done
PEERS="$PEERS_BIN"

# --- scratch space, processes, cleanup ------------------------------------------------------------
# Logs and configs live on tmpfs when there is one: tinyproxy fsync()s its log after every line,
# and on a disk that, not the proxy, would be what gets measured.
SCRATCH=/tmp
[[ -d /dev/shm && -w /dev/shm ]] && SCRATCH=/dev/shm
WORK="$(mktemp -d "$SCRATCH/egressd-peers.XXXXXX")"
chmod 755 "$WORK"
# egressd watches the directory of its config file: a log written there would change on every
# request and make it reload continuously. Its logs go to their own directory.
mkdir -p "$WORK/logs"
PIDS=()
cleanup() {
    local pid i
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for ((i = 0; i < 60; i++)); do
        for pid in "${PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null && break
        done
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    for pid in "${PIDS[@]}"; do
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n "${KEEP:-}" ]]; then
        echo "scratch kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Idle tunnels need two descriptors each in a proxy: raise the soft limit to the hard one.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
IDLE_N=10000
if ((NOFILE < 2 * IDLE_N + 300)); then
    IDLE_N=$(((NOFILE - 300) / 2 / 100 * 100))
    log "open-file limit $NOFILE: idle-tunnel test uses $IDLE_N tunnels instead of 10000"
fi

# Pinning (and, with NICE=-10 say, a higher priority than other work on a shared machine).
PIN_SUT=(nice -n "$NICE" taskset -c "$SUT_CPU")
PIN_GEN=(nice -n "$NICE" taskset -c "$GEN_CPU")
# gen CMD ARGS...: the load generator on the generator core (not for background jobs: $! would
# be a subshell).
gen() { "${PIN_GEN[@]}" "$PEERS" "$@"; }

read -r P_HTTP P_HELLO P_TLS P_BULK P_HOLD P_EPROXY P_EDNS P_EADMIN P_SQUID P_TINY P_DNSDIST P_UNBOUND P_UP \
    < <("$PEERS" free-ports --count 13)
ORIGIN_PORTS="$P_HTTP $P_HELLO $P_TLS $P_BULK $P_HOLD"

wait_tcp() { # wait_tcp PORT: until 127.0.0.1:PORT accepts (≤ 30 s)
    local i
    for ((i = 0; i < 600; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    echo "nothing listening on 127.0.0.1:$1" >&2
    return 1
}

wait_line() { # wait_line FILE PATTERN PID: until FILE has a line with PATTERN (≤ 60 s)
    local i
    for ((i = 0; i < 1200; i++)); do
        if grep -qF -- "$2" "$1" 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$3" 2>/dev/null; then
            echo "process $3 exited; $1:" >&2
            tail -20 "$1" >&2
            return 1
        fi
        sleep 0.05
    done
    echo "timed out waiting for '$2' in $1" >&2
    return 1
}

stop() { # stop PID: TERM, then KILL after 5 s
    local pid=$1 i
    kill "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local keep=() p
    for p in "${PIDS[@]}"; do
        [[ $p == "$pid" ]] || keep+=("$p")
    done
    PIDS=("${keep[@]}")
}

# --- results --------------------------------------------------------------------------------------
declare -A R=()
add() { R[$1]="${R[$1]:-} $2"; }          # add KEY VALUE: one run's value
kv() { sed -n "s/.*\<$1=\([^ ]*\).*/\1/p" <<<"$2" | head -1; }
med() { # med KEY: the median of the runs' values ("n/a" if none)
    local vals
    read -r -a vals <<<"${R[$1]:-}"
    if ((${#vals[@]} == 0)); then
        echo "n/a"
        return
    fi
    printf '%s\n' "${vals[@]}" | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'
}
cpu_us() { kv cpu_us "$("$PEERS" cpu --pid "$1")"; }
rss_kib() { kv rss_kib "$("$PEERS" cpu --pid "$1")"; }
RAW="$WORK/raw.txt"
note() { echo "$*" >>"$RAW"; }

# --- the policy, written for every system ---------------------------------------------------------
EXACT=(http.bench.test tls.bench.test)
for ((i = 0; i < 98; i++)); do EXACT+=("api$i.corp$((i % 10)).test"); done
SUFFIX=()
for ((i = 0; i < 100; i++)); do SUFFIX+=("zone$i.test"); done
mkdir -p "$WORK/q"
# DNS workloads: 100 allowed names (50 exact, 50 below a suffix); the mix adds 100 denied ones.
: >"$WORK/q/hit.txt"
: >"$WORK/q/mix.txt"
for ((i = 0; i < 100; i++)); do
    if ((i < 50)); then allowed="api$i.corp$((i % 10)).test"; else allowed="h$((i % 5)).zone$((i % 10)).test"; fi
    echo "$allowed A" >>"$WORK/q/hit.txt"
    printf '%s A\nb%d.blocked%d.test A\n' "$allowed" "$i" "$((i % 10))" >>"$WORK/q/mix.txt"
done

# egressd
mkdir -p "$WORK/egressd/rules"
{
    echo '[[rule]]'
    echo 'name = "bench"'
    printf 'hosts = ['
    printf '"%s", ' "${EXACT[@]}"
    printf '".%s", ' "${SUFFIX[@]}"
    echo ']'
    echo "ports = [${ORIGIN_PORTS// /, }]"
} >"$WORK/egressd/rules/bench.toml"
egressd_config() { # egressd_config FILE [RULE_GLOB]
    cat >"$1" <<EOF
[proxy]
listen = ["127.0.0.1:$P_EPROXY"]
max_connections = 30000

[dns]
listen = ["127.0.0.1:$P_EDNS"]
upstreams = ["127.0.0.1:$P_UP"]

[admin]
listen = "127.0.0.1:$P_EADMIN"

[guard]
allow_cidrs = ["127.0.0.0/8"]

[policy]
files = ["${2:-rules/bench.toml}"]

[hosts]
"http.bench.test" = ["127.0.0.1"]
"tls.bench.test" = ["127.0.0.1"]
EOF
}
egressd_config "$WORK/egressd/egressd.toml"

# Squid: dstdomain "name" is exact, ".name" is the name and below (as egressd's ".name").
mkdir -p "$WORK/squid"
chmod 777 "$WORK/squid"
printf '%s\n' "${EXACT[@]}" >"$WORK/squid/allowed.txt"
printf '.%s\n' "${SUFFIX[@]}" >>"$WORK/squid/allowed.txt"
printf '127.0.0.1 http.bench.test tls.bench.test\n' >"$WORK/squid/hosts"
squid_config() { # squid_config FILE [EXTRA_ACL_FILE]
    cat >"$1" <<EOF
http_port 127.0.0.1:$P_SQUID
visible_hostname peers-bench
pid_filename $WORK/squid/squid.pid
cache_log $WORK/squid/cache.log
access_log daemon:$WORK/squid/access.log squid
cache_store_log none
coredump_dir $WORK/squid
hosts_file $WORK/squid/hosts
pinger_enable off
shutdown_lifetime 1 seconds
max_filedescriptors $NOFILE
cache deny all
acl bench_ports port $ORIGIN_PORTS
acl allowed dstdomain "$WORK/squid/allowed.txt"
EOF
    if [[ -n "${2:-}" ]]; then
        echo "acl big dstdomain \"$2\"" >>"$1"
        echo "http_access allow big bench_ports" >>"$1"
    fi
    cat >>"$1" <<EOF
http_access deny !bench_ports
http_access allow allowed
http_access deny all
EOF
}
squid_config "$WORK/squid/squid.conf"

# tinyproxy: fnmatch filter on the host, default deny. It resolves with getaddrinfo, so it runs
# in a private mount namespace where /etc/hosts maps the test names to 127.0.0.1.
mkdir -p "$WORK/tinyproxy"
chmod 777 "$WORK/tinyproxy"
{
    printf '%s\n' "${EXACT[@]}"
    for s in "${SUFFIX[@]}"; do printf '%s\n*.%s\n' "$s" "$s"; done
} >"$WORK/tinyproxy/filter"
{
    cat /etc/hosts
    printf '127.0.0.1 http.bench.test tls.bench.test\n'
} >"$WORK/tinyproxy/hosts"
{
    cat <<EOF
User nobody
Group nogroup
Port $P_TINY
Listen 127.0.0.1
Timeout 600
LogFile "$WORK/tinyproxy/tinyproxy.log"
LogLevel Info
PidFile "$WORK/tinyproxy/tinyproxy.pid"
MaxClients $((NOFILE / 2))
Allow 127.0.0.1
ViaProxyName "tinyproxy"
Filter "$WORK/tinyproxy/filter"
FilterType fnmatch
FilterDefaultDeny Yes
FilterURLs Off
EOF
    for p in $ORIGIN_PORTS; do echo "ConnectPort $p"; done
} >"$WORK/tinyproxy/tinyproxy.conf"

# dnsdist: exact names in a DNSNameSet, suffixes in a SuffixMatchNode, everything else NXDOMAIN;
# a packet cache, as a production dnsdist in front of a resolver has.
mkdir -p "$WORK/dnsdist"
{
    echo "setLocal('127.0.0.1:$P_DNSDIST')"
    echo "setSecurityPollSuffix('')"
    echo "newServer({address='127.0.0.1:$P_UP'})"
    echo "exact = newDNSNameSet()"
    for n in "${EXACT[@]}"; do echo "exact:add(newDNSName('$n'))"; done
    echo "sfx = newSuffixMatchNode()"
    for s in "${SUFFIX[@]}"; do echo "sfx:add('$s')"; done
    echo "addAction(NotRule(OrRule({QNameSetRule(exact), SuffixMatchNodeRule(sfx, true)})), RCodeAction(DNSRCode.NXDOMAIN))"
    echo "getPool(''):setCache(newPacketCache(100000))"
} >"$WORK/dnsdist/dnsdist.conf"

# Unbound: forwarding to the upstream; "." is NXDOMAIN and each allowed name is a transparent
# local zone (a local zone covers the names below it too, so an exact name is a little looser
# here — the workload never asks below an exact name).
mkdir -p "$WORK/unbound"
chmod 777 "$WORK/unbound"
{
    cat <<EOF
server:
    interface: 127.0.0.1
    port: $P_UNBOUND
    num-threads: 1
    do-ip6: no
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "$WORK/unbound"
    pidfile: "$WORK/unbound/unbound.pid"
    logfile: "$WORK/unbound/unbound.log"
    use-syslog: no
    verbosity: 1
    module-config: "iterator"
    do-not-query-localhost: no
    access-control: 127.0.0.0/8 allow
    local-zone: "." always_nxdomain
EOF
    for n in "${EXACT[@]}" "${SUFFIX[@]}"; do echo "    local-zone: \"$n.\" transparent"; done
    cat <<EOF
forward-zone:
    name: "."
    forward-addr: 127.0.0.1@$P_UP
EOF
} >"$WORK/unbound/unbound.conf"

# --- starting each system -------------------------------------------------------------------------
SUT_PID=0
start_egressd() { # start_egressd CONFIG LOG [RUST_LOG]
    RUST_LOG="${3:-info}" "${PIN_SUT[@]}" "$EGRESSD" run --config "$1" >"$2" 2>&1 &
    SUT_PID=$!
    PIDS+=("$SUT_PID")
    wait_line "$2" '"event":"start"' "$SUT_PID"
}
start_squid() { # start_squid CONFIG
    rm -f "$WORK/squid/cache.log"
    "${PIN_SUT[@]}" squid -N -f "$1" >"$WORK/squid/stdout.log" 2>&1 &
    SUT_PID=$!
    PIDS+=("$SUT_PID")
    wait_line "$WORK/squid/cache.log" "Accepting HTTP Socket connections" "$SUT_PID"
    wait_tcp "$P_SQUID"
}
start_tinyproxy() {
    # shellcheck disable=SC2016 # expanded by the inner shell
    nice -n "$NICE" unshare -m sh -c 'mount --bind "$1" /etc/hosts && exec taskset -c "$2" tinyproxy -d -c "$3"' sh \
        "$WORK/tinyproxy/hosts" "$SUT_CPU" "$WORK/tinyproxy/tinyproxy.conf" >"$WORK/tinyproxy/stdout.log" 2>&1 &
    SUT_PID=$!
    PIDS+=("$SUT_PID")
    wait_tcp "$P_TINY"
}
start_dnsdist() {
    "${PIN_SUT[@]}" dnsdist --supervised --disable-syslog -C "$WORK/dnsdist/dnsdist.conf" >"$WORK/dnsdist/stdout.log" 2>&1 &
    SUT_PID=$!
    PIDS+=("$SUT_PID")
    "$PEERS" dns-probe --port "$P_DNSDIST" >/dev/null
}
start_unbound() {
    "${PIN_SUT[@]}" unbound -d -c "$WORK/unbound/unbound.conf" >"$WORK/unbound/stdout.log" 2>&1 &
    SUT_PID=$!
    PIDS+=("$SUT_PID")
    "$PEERS" dns-probe --port "$P_UNBOUND" >/dev/null
}
UP_PID=0
start_upstream() { # start_upstream CPU
    [[ $UP_PID == 0 ]] || stop "$UP_PID"
    nice -n "$NICE" taskset -c "$1" "$PEERS" dns-upstream --port "$P_UP" >"$WORK/upstream.log" 2>&1 &
    UP_PID=$!
    PIDS+=("$UP_PID")
    "$PEERS" dns-probe --port "$P_UP" >/dev/null
}

# --- origins --------------------------------------------------------------------------------------
"${PIN_GEN[@]}" "$PEERS" origins --http "$P_HTTP" --hello "$P_HELLO" --tls "$P_TLS" --bulk "$P_BULK" --hold "$P_HOLD" \
    --ca-out "$WORK/ca.pem" >"$WORK/origins.log" 2>&1 &
ORIGINS_PID=$!
PIDS+=("$ORIGINS_PID")
wait_line "$WORK/origins.log" ready "$ORIGINS_PID"

origin_stats() { # the origin's counters, through bash's /dev/tcp
    local line
    exec 3<>"/dev/tcp/127.0.0.1/$P_HTTP"
    printf 'GET /__stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' >&3
    line=$(grep -a 'http_conns=' <&3 || true)
    exec 3<&-
    echo "$line"
}

# --- proxy measurements ---------------------------------------------------------------------------
proxy_suite() { # proxy_suite NAME VIA(direct|127.0.0.1:PORT) PID(0 for direct)
    local name=$1 via=$2 pid=$3 run out c0 c1 reqs wrk_url streams
    local sutarg=() stats0 stats1
    stats0=$(origin_stats)
    if [[ $pid != 0 ]]; then
        sutarg=(--sut-pid "$pid")
        add "$name.rss_idle_mib" "$(awk -v k="$(rss_kib "$pid")" 'BEGIN {printf "%.1f", k / 1024}')"
        log "$name: $IDLE_N idle tunnels"
        out=$(gen idle --via "$via" --target "tls.bench.test:$P_HOLD" --stages "2000,$IDLE_N" --sut-pid "$pid")
        note "$name idle: $out"
        add "$name.idle2k_tunnels" "$(kv tunnels_2000 "$out")"
        add "$name.idle2k_mib" "$(awk -v k="$(kv rss_2000_kib "$out")" 'BEGIN {printf "%.1f", k / 1024}')"
        add "$name.idle10k_tunnels" "$(kv "tunnels_$IDLE_N" "$out")"
        add "$name.idle10k_mib" "$(awk -v k="$(kv "rss_${IDLE_N}_kib" "$out")" 'BEGIN {printf "%.1f", k / 1024}')"
        sleep 2
    fi
    # wrk: absolute-form requests through a proxy, origin-form straight to the origin.
    if [[ $via == direct ]]; then
        wrk_url="http://127.0.0.1:$P_HTTP/"
        printf '%s\n' 'wrk.method = "GET"' >"$WORK/wrk.lua"
    else
        wrk_url="http://$via/"
        cat >"$WORK/wrk.lua" <<EOF
wrk.method = "GET"
wrk.path = "http://http.bench.test:$P_HTTP/"
wrk.headers["Host"] = "http.bench.test:$P_HTTP"
EOF
    fi
    gen hello-rate --via "$via" --target "tls.bench.test:$P_HELLO" --secs 1 --warm 0.2 >/dev/null 2>&1 || true
    for ((run = 1; run <= RUNS; run++)); do
        log "$name: run $run/$RUNS"
        out=$(gen hello-rate --via "$via" --target "tls.bench.test:$P_HELLO" --conc 32 --secs "$SECS" "${sutarg[@]}")
        note "$name hello-rate: $out"
        add "$name.hello_rate" "$(kv rate "$out")"
        add "$name.hello_cpu" "$(kv cpu_us_per_op "$out")"
        add "$name.hello_err" "$(kv errors "$out")"

        out=$(gen hello-lat --via "$via" --target "tls.bench.test:$P_HELLO" --rate "$TUNNEL_RATE" --secs "$SECS" "${sutarg[@]}")
        note "$name hello-lat: $out"
        add "$name.lat_p50" "$(kv p50_ms "$out")"
        add "$name.lat_p99" "$(kv p99_ms "$out")"
        add "$name.lat_cpu" "$(kv cpu_us_per_op "$out")"

        out=$(gen tls-rate --via "$via" --target "tls.bench.test:$P_TLS" --ca "$WORK/ca.pem" --conc 16 --secs "$SECS" "${sutarg[@]}")
        note "$name tls-rate: $out"
        add "$name.tls_rate" "$(kv rate "$out")"
        add "$name.tls_cpu" "$(kv cpu_us_per_op "$out")"

        for streams in 1 8 32; do
            out=$(gen bulk --via "$via" --target "tls.bench.test:$P_BULK" --streams "$streams" --secs "$SECS" "${sutarg[@]}")
            note "$name bulk: $out"
            add "$name.bulk$streams" "$(kv mb_per_s "$out")"
            add "$name.bulk${streams}_cpu" "$(kv cpu_us_per_mb "$out")"
        done
        sleep 0.5

        "${PIN_GEN[@]}" wrk -t1 -c32 -d1s -s "$WORK/wrk.lua" "$wrk_url" >/dev/null 2>&1 || true
        [[ $pid == 0 ]] || c0=$(cpu_us "$pid")
        out=$("${PIN_GEN[@]}" wrk -t1 -c32 -d"${SECS}s" --latency -s "$WORK/wrk.lua" "$wrk_url")
        [[ $pid == 0 ]] || c1=$(cpu_us "$pid")
        note "$name wrk: $(tr '\n' ' ' <<<"$out")"
        reqs=$(awk '/requests in/ {print $1}' <<<"$out")
        add "$name.http_rate" "$(awk '/^Requests\/sec/ {print $2}' <<<"$out")"
        add "$name.http_p99" "$(wrk_p99 "$out")"
        add "$name.http_non2xx" "$(awk '/Non-2xx/ {print $NF; f = 1} END {if (!f) print 0}' <<<"$out")"
        if [[ $pid != 0 && -n $reqs && $reqs != 0 ]]; then
            add "$name.http_cpu" "$(awk -v c=$((c1 - c0)) -v n="$reqs" 'BEGIN {printf "%.2f", c / n}')"
        fi
    done
    # How often the proxy opened a new connection to the HTTP origin (keep-alive reuse upstream).
    stats1=$(origin_stats)
    note "$name origin counters: before: $stats0; after: $stats1"
    add "$name.http_upstream_conns_per_1k" "$(awk -v c0="$(kv http_conns "$stats0")" -v c1="$(kv http_conns "$stats1")" \
        -v r0="$(kv http_requests "$stats0")" -v r1="$(kv http_requests "$stats1")" \
        'BEGIN {if (r1 > r0) printf "%.1f", 1000 * (c1 - c0) / (r1 - r0); else print "n/a"}')"
}
wrk_p99() { # the 99% line of wrk's latency distribution, in ms
    awk '$1 == "99%" {v = $2; u = v; gsub(/[0-9.]/, "", u); gsub(/[a-z]/, "", v);
        m = (u == "us") ? v / 1000 : (u == "s") ? v * 1000 : v; printf "%.3f", m}' <<<"$1"
}

diag_proxy() { # diag_proxy NAME VIA PID: tunnel rate and HTTP keep-alive only
    local name=$1 via=$2 pid=$3 run out c0 c1 reqs
    cat >"$WORK/wrk.lua" <<EOF
wrk.method = "GET"
wrk.path = "http://http.bench.test:$P_HTTP/"
wrk.headers["Host"] = "http.bench.test:$P_HTTP"
EOF
    for ((run = 1; run <= RUNS; run++)); do
        out=$(gen hello-rate --via "$via" --target "tls.bench.test:$P_HELLO" --conc 32 --secs "$SECS" --sut-pid "$pid")
        note "$name hello-rate: $out"
        add "$name.hello_rate" "$(kv rate "$out")"
        add "$name.hello_cpu" "$(kv cpu_us_per_op "$out")"
        "${PIN_GEN[@]}" wrk -t1 -c32 -d1s -s "$WORK/wrk.lua" "http://$via/" >/dev/null 2>&1 || true
        c0=$(cpu_us "$pid")
        out=$("${PIN_GEN[@]}" wrk -t1 -c32 -d"${SECS}s" --latency -s "$WORK/wrk.lua" "http://$via/")
        c1=$(cpu_us "$pid")
        reqs=$(awk '/requests in/ {print $1}' <<<"$out")
        add "$name.http_rate" "$(awk '/^Requests\/sec/ {print $2}' <<<"$out")"
        add "$name.http_cpu" "$(awk -v c=$((c1 - c0)) -v n="${reqs:-0}" 'BEGIN {if (n) printf "%.2f", c / n; else print "n/a"}')"
    done
}

if [[ ",$ONLY," == *,proxy,* ]]; then
    log "proxy: direct (no proxy)"
    proxy_suite direct direct 0

    log "proxy: egressd"
    start_egressd "$WORK/egressd/egressd.toml" "$WORK/logs/egressd-proxy.log"
    proxy_suite egressd "127.0.0.1:$P_EPROXY" "$SUT_PID"
    stop "$SUT_PID"
    note "egressd audit lines: $(grep -c '"message":"decision"' "$WORK/logs/egressd-proxy.log" || true)"

    # Diagnostic, not a production setting: the same with the audit line off (RUST_LOG=info,egressd::audit=off),
    # to show what the audit line costs.
    log "proxy: egressd without the audit line (diagnostic)"
    start_egressd "$WORK/egressd/egressd.toml" "$WORK/logs/egressd-nolog.log" "info,egressd::audit=off"
    diag_proxy egressd_nolog "127.0.0.1:$P_EPROXY" "$SUT_PID"
    stop "$SUT_PID"

    log "proxy: squid"
    start_squid "$WORK/squid/squid.conf"
    proxy_suite squid "127.0.0.1:$P_SQUID" "$SUT_PID"
    stop "$SUT_PID"
    sleep 1
    note "squid access.log lines: $(wc -l <"$WORK/squid/access.log" 2>/dev/null || echo 0)"

    log "proxy: tinyproxy"
    start_tinyproxy
    proxy_suite tinyproxy "127.0.0.1:$P_TINY" "$SUT_PID"
    stop "$SUT_PID"
    note "tinyproxy log lines: $(wc -l <"$WORK/tinyproxy/tinyproxy.log" 2>/dev/null || echo 0)"
fi

# --- DNS measurements -----------------------------------------------------------------------------
dnsperf_qps() { # dnsperf_qps NAME PORT PID WORKLOAD
    local out c0=0 c1=0 done_q
    [[ $3 == 0 ]] || c0=$(cpu_us "$3")
    out=$("${PIN_GEN[@]}" dnsperf -s 127.0.0.1 -p "$2" -d "$WORK/q/$4.txt" -l "$SECS" -c 4 -q 200 -t 2 2>&1)
    [[ $3 == 0 ]] || c1=$(cpu_us "$3")
    done_q=$(awk '/Queries completed/ {print $3}' <<<"$out")
    note "$1 dnsperf $4: $(grep -E 'completed|lost|Response codes|per second|Average Latency' <<<"$out" | tr -s ' ' | tr '\n' ';')"
    add "$1.$4_qps" "$(awk '/Queries per second/ {printf "%.0f", $4}' <<<"$out")"
    if [[ $3 != 0 && -n $done_q && $done_q != 0 ]]; then
        add "$1.$4_cpu" "$(awk -v c=$((c1 - c0)) -v n="$done_q" 'BEGIN {printf "%.2f", c / n}')"
    fi
}
dnsperf_p99() { # dnsperf_p99 NAME PORT PID WORKLOAD: latency and CPU per query at DNS_RATE (dnsperf -v)
    local name=$1 port=$2 pid=$3 w=$4 out c0=0 c1=0 n
    [[ $pid == 0 ]] || c0=$(cpu_us "$pid")
    out=$("${PIN_GEN[@]}" dnsperf -s 127.0.0.1 -p "$port" -d "$WORK/q/$w.txt" -l "$SECS" -Q "$DNS_RATE" -c 4 -t 2 -v 2>&1)
    [[ $pid == 0 ]] || c1=$(cpu_us "$pid")
    n=$(awk '/Queries completed/ {print $3}' <<<"$out")
    if [[ $pid != 0 && -n $n && $n != 0 ]]; then
        add "$name.${w}_cpu_fixed" "$(awk -v c=$((c1 - c0)) -v n="$n" 'BEGIN {printf "%.2f", c / n}')"
    fi
    add "$name.${w}_p99" "$(awk '$1 == ">" {print $NF}' <<<"$out" | sort -g |
        awk '{v[NR] = $1} END {if (NR) printf "%.3f", v[int(NR * 0.99)] * 1000; else print "n/a"}')"
    add "$name.${w}_rcodes" "$(awk '$1 == ">" {c[$2]++} END {for (k in c) printf "%s:%d,", k, c[k]}' <<<"$out")"
}
dns_suite() { # dns_suite NAME PORT PID
    local run w
    if [[ $3 != 0 ]]; then
        add "$1.rss_idle_mib" "$(awk -v k="$(rss_kib "$3")" 'BEGIN {printf "%.1f", k / 1024}')"
    fi
    # Warm the caches: every allowed name once.
    "${PIN_GEN[@]}" dnsperf -s 127.0.0.1 -p "$2" -d "$WORK/q/mix.txt" -n 2 >/dev/null 2>&1 || true
    for ((run = 1; run <= RUNS; run++)); do
        log "$1: DNS run $run/$RUNS"
        for w in hit mix; do
            dnsperf_qps "$1" "$2" "$3" "$w"
            dnsperf_p99 "$1" "$2" "$3" "$w"
        done
    done
}

if [[ ",$ONLY," == *,dns,* ]]; then
    log "dns: upstream alone (on the SUT core)"
    start_upstream "$SUT_CPU"
    dns_suite upstream "$P_UP" "$UP_PID"
    start_upstream "$GEN_CPU"

    log "dns: egressd"
    start_egressd "$WORK/egressd/egressd.toml" "$WORK/logs/egressd-dns.log"
    dns_suite egressd "$P_EDNS" "$SUT_PID"
    stop "$SUT_PID"
    note "egressd dns audit lines: $(grep -c '"kind":"dns"' "$WORK/logs/egressd-dns.log" || true)"

    log "dns: egressd without the audit line (diagnostic)"
    start_egressd "$WORK/egressd/egressd.toml" "$WORK/logs/egressd-dns-nolog.log" "info,egressd::audit=off"
    "${PIN_GEN[@]}" dnsperf -s 127.0.0.1 -p "$P_EDNS" -d "$WORK/q/mix.txt" -n 2 >/dev/null 2>&1 || true
    for ((run = 1; run <= RUNS; run++)); do
        dnsperf_qps egressd_nolog "$P_EDNS" "$SUT_PID" hit
        dnsperf_qps egressd_nolog "$P_EDNS" "$SUT_PID" mix
    done
    stop "$SUT_PID"

    log "dns: dnsdist"
    start_dnsdist
    dns_suite dnsdist "$P_DNSDIST" "$SUT_PID"
    stop "$SUT_PID"

    log "dns: unbound"
    start_unbound
    dns_suite unbound "$P_UNBOUND" "$SUT_PID"
    stop "$SUT_PID"
fi

# --- 1M-name policy: memory, load and reload time, request latency during the reload ---------------
if [[ ",$ONLY," == *,reload,* ]]; then
    log "reload: generating 1,000,000 names"
    mkdir -p "$WORK/big/rules"
    "$PEERS" gen-names --count 1000000 --out "$WORK/big/rules/big.txt" >/dev/null
    cp "$WORK/egressd/rules/bench.toml" "$WORK/big/rules/bench.toml"
    {
        echo '[[rule]]'
        echo 'name = "big"'
        echo 'hosts_files = ["big.txt"]'
        echo "ports = [${ORIGIN_PORTS// /, }]"
    } >"$WORK/big/rules/big.toml"
    egressd_config "$WORK/big/egressd.toml" "rules/*.toml"

    log "reload: egressd with 1M names"
    t0=$(date +%s%N)
    start_egressd "$WORK/big/egressd.toml" "$WORK/logs/egressd-big.log"
    t1=$(date +%s%N)
    add egressd.big_load_s "$(awk -v d=$((t1 - t0)) 'BEGIN {printf "%.2f", d / 1e9}')"
    sleep 1
    add egressd.big_rss_mib "$(awk -v k="$(rss_kib "$SUT_PID")" 'BEGIN {printf "%.1f", k / 1024}')"
    for ((run = 1; run <= RUNS; run++)); do
        log "reload: egressd run $run/$RUNS"
        out=$(gen http-fixed --via "127.0.0.1:$P_EPROXY" --url "http://http.bench.test:$P_HTTP/" --rate "$RELOAD_RATE" \
            --conns 8 --warm 1 --secs 5 --reload-at 2.5 --touch "$WORK/big/rules/big.txt" \
            --log "$WORK/logs/egressd-big.log" --done-pattern '"result":"success"')
        note "egressd reload: $out"
        add egressd.reload_ms "$(kv reload_ms "$out")"
        add egressd.reload_before_p99 "$(kv before_p99_ms "$out")"
        add egressd.reload_during_p99 "$(kv during_p99_ms "$out")"
        add egressd.reload_during_max "$(kv during_max_ms "$out")"
        add egressd.reload_errors "$(kv errors "$out")"
    done
    add egressd.big_rss_after_mib "$(awk -v k="$(rss_kib "$SUT_PID")" 'BEGIN {printf "%.1f", k / 1024}')"
    stop "$SUT_PID"

    log "reload: squid with 1M names (one run)"
    squid_config "$WORK/squid/big.conf" "$WORK/big/rules/big.txt"
    t0=$(date +%s%N)
    start_squid "$WORK/squid/big.conf"
    t1=$(date +%s%N)
    add squid.big_load_s "$(awk -v d=$((t1 - t0)) 'BEGIN {printf "%.2f", d / 1e9}')"
    sleep 1
    add squid.big_rss_mib "$(awk -v k="$(rss_kib "$SUT_PID")" 'BEGIN {printf "%.1f", k / 1024}')"
    out=$(gen http-fixed --via "127.0.0.1:$P_SQUID" --url "http://http.bench.test:$P_HTTP/" --rate "$RELOAD_RATE" \
        --conns 8 --warm 1 --secs 5 --reload-at 2.5 --hup-pid "$SUT_PID" \
        --log "$WORK/squid/cache.log" --done-pattern "Accepting HTTP Socket connections")
    note "squid reload: $out"
    add squid.reload_ms "$(kv reload_ms "$out")"
    add squid.reload_before_p99 "$(kv before_p99_ms "$out")"
    add squid.reload_during_p99 "$(kv during_p99_ms "$out")"
    add squid.reload_during_max "$(kv during_max_ms "$out")"
    add squid.reload_errors "$(kv errors "$out")"
    stop "$SUT_PID"
fi

# --- the report -----------------------------------------------------------------------------------
ratio() { # ratio A B: A/B to two decimals, or n/a
    awk -v a="$1" -v b="$2" 'BEGIN {if (a == "n/a" || b == "n/a" || a == "" || b == "" || b + 0 == 0) print "n/a"; else printf "%.2f", a / b}'
}
best() { # best high|low A B: the better of two peers' values
    awk -v d="$1" -v a="$2" -v b="$3" 'BEGIN {
        if (a == "n/a" || a == "") {print b; exit} if (b == "n/a" || b == "") {print a; exit}
        if (d == "high") print (a + 0 > b + 0 ? a : b); else print (a + 0 < b + 0 ? a : b) }'
}
row() { # row LABEL KEY high|low [BASELINE_KEY] : egressd, peers, ratios
    local label=$1 key=$2 dir=$3 base=${4:-} e s t b
    e=$(med "egressd.$key")
    s=$(med "squid.$key")
    t=$(med "tinyproxy.$key")
    b=$(best "$dir" "$s" "$t")
    printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$label" "$e" "$s" "$t" \
        "${base:+$(med "direct.$base")}" "$(ratio "$e" "$b")" "${base:+$(ratio "$e" "$(med "direct.$base")")}"
}
dnsrow() {
    local label=$1 key=$2 dir=$3 e d u b
    e=$(med "egressd.$key")
    d=$(med "dnsdist.$key")
    u=$(med "unbound.$key")
    b=$(best "$dir" "$d" "$u")
    printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$label" "$e" "$d" "$u" "$(med "upstream.$key")" \
        "$(ratio "$e" "$b")" "$(ratio "$e" "$(med "upstream.$key")")"
}
nolog_table() { # nolog_table TITLE KEY...: egressd with and without its audit line
    local k
    echo "| $1 | egressd | egressd, no audit line | ratio |"
    echo "|---|---|---|---|"
    shift
    for k in "$@"; do
        printf '| %s | %s | %s | %s |\n' "$k" "$(med "egressd.$k")" "$(med "egressd_nolog.$k")" \
            "$(ratio "$(med "egressd.$k")" "$(med "egressd_nolog.$k")")"
    done
}
{
    echo "## Peer benchmark run $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "Median of $RUNS runs of ${SECS}s; SUT on core $SUT_CPU, load generator + origins + upstream on core $GEN_CPU; nice $NICE."
    echo "Idle-tunnel stage: $IDLE_N tunnels (open-file limit $NOFILE). Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
    echo
    if [[ ",$ONLY," == *,proxy,* ]]; then
        echo "| proxy measure | egressd | Squid | tinyproxy | direct | egressd / best peer | egressd / direct |"
        echo "|---|---|---|---|---|---|---|"
        row "CONNECT + ClientHello + reply, tunnels/s" hello_rate high hello_rate
        row "  SUT CPU µs per tunnel" hello_cpu low
        row "tunnel p50 at ${TUNNEL_RATE}/s, ms" lat_p50 low lat_p50
        row "tunnel p99 at ${TUNNEL_RATE}/s, ms" lat_p99 low lat_p99
        row "  SUT CPU µs per tunnel at ${TUNNEL_RATE}/s" lat_cpu low
        row "full TLS handshakes through the tunnel, /s" tls_rate high tls_rate
        row "  SUT CPU µs per handshake tunnel" tls_cpu low
        row "bulk, 1 tunnel, MB/s" bulk1 high bulk1
        row "  SUT CPU µs per MB" bulk1_cpu low
        row "bulk, 8 tunnels, MB/s" bulk8 high bulk8
        row "  SUT CPU µs per MB" bulk8_cpu low
        row "bulk, 32 tunnels, MB/s" bulk32 high bulk32
        row "  SUT CPU µs per MB" bulk32_cpu low
        row "plain HTTP keep-alive (wrk -c32), req/s" http_rate high http_rate
        row "  p99 ms (closed loop)" http_p99 low http_p99
        row "  SUT CPU µs per request" http_cpu low
        row "  new origin connections per 1,000 requests" http_upstream_conns_per_1k low http_upstream_conns_per_1k
        row "RSS idle, MiB" rss_idle_mib low
        row "RSS with 2,000 idle tunnels, MiB" idle2k_mib low
        row "RSS with $IDLE_N idle tunnels, MiB" idle10k_mib low
        row "  tunnels still open at $IDLE_N" idle10k_tunnels high
        echo
        echo "Diagnostic (not a production setting): egressd with the audit line off (RUST_LOG=info,egressd::audit=off)."
        echo
        nolog_table "measure" hello_rate hello_cpu http_rate http_cpu
        echo
    fi
    if [[ ",$ONLY," == *,dns,* ]]; then
        echo "| DNS measure | egressd | dnsdist | Unbound | upstream alone | egressd / best peer | egressd / upstream |"
        echo "|---|---|---|---|---|---|---|"
        dnsrow "cache-hit workload, qps (dnsperf)" hit_qps high
        dnsrow "  SUT CPU µs per query" hit_cpu low
        dnsrow "  p99 ms at ${DNS_RATE} qps" hit_p99 low
        dnsrow "  SUT CPU µs per query at ${DNS_RATE} qps" hit_cpu_fixed low
        dnsrow "50% blocked mix, qps" mix_qps high
        dnsrow "  SUT CPU µs per query" mix_cpu low
        dnsrow "  p99 ms at ${DNS_RATE} qps" mix_p99 low
        dnsrow "  SUT CPU µs per query at ${DNS_RATE} qps" mix_cpu_fixed low
        dnsrow "RSS idle, MiB" rss_idle_mib low
        echo
        nolog_table "DNS diagnostic (audit line off, RUST_LOG=info,egressd::audit=off)" hit_qps hit_cpu mix_qps mix_cpu
        echo
    fi
    if [[ ",$ONLY," == *,reload,* ]]; then
        echo "| 1M-name policy | egressd | Squid (1 run) | egressd / Squid |"
        echo "|---|---|---|---|"
        for k in big_load_s big_rss_mib reload_ms reload_before_p99 reload_during_p99 reload_during_max reload_errors; do
            printf '| %s | %s | %s | %s |\n' "$k" "$(med "egressd.$k")" "$(med "squid.$k")" \
                "$(ratio "$(med "egressd.$k")" "$(med "squid.$k")")"
        done
        echo "| RSS after the reloads, MiB | $(med egressd.big_rss_after_mib) | | |"
        echo
    fi
    echo "<details><summary>raw runs</summary>"
    echo
    echo '```'
    cat "$RAW" 2>/dev/null || true
    printf '%s\n' "tinyproxy ran in a private mount namespace with /etc/hosts mapping the test names."
    for k in $(printf '%s\n' "${!R[@]}" | sort); do
        echo "$k:${R[$k]}"
    done
    echo '```'
    echo
    echo "</details>"
    echo
    echo "Wall time: $(($(date +%s) - T_START)) s."
} >"$WORK/report.md"
mkdir -p "$(dirname "$OUT")"
cp "$WORK/report.md" "$OUT"
cat "$WORK/report.md"
log "report written to $OUT"
