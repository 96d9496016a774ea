#!/usr/bin/env bash
# Redirects client TCP traffic to egressd's transparent listeners with nftables.
#
#   nftables.sh setup    --source 10.0.0.0/16 [--iface eth1] [options]
#   nftables.sh teardown [--mark MARK --table N]
#   nftables.sh status
#
# Everything lives in one table, `inet egressd`. `setup` replaces that table atomically in
# a single `nft -f` transaction (create-if-missing, delete, recreate), so running it twice
# leaves exactly one set of rules; `teardown` deletes the table and the TPROXY routing.
# The options are the same as iptables.sh's. See README.md next to this script.
set -euo pipefail

readonly TABLE=egressd

usage() {
  cat <<'EOF'
Usage: nftables.sh setup|teardown|status [options]

Selectors (setup needs at least one, or --local):
  -s, --source CIDR      redirect traffic from this client subnet (repeatable; IPv4 or IPv6)
  -i, --iface IFACE      redirect traffic arriving on this interface (repeatable)
      --local            also redirect connections made on this host (nat output hook;
                         redirect mode only); requires --exclude-uid so egressd's own
                         connections are never redirected back to egressd

Ports:
      --tls-port PORT    egressd's proxy.transparent_tls port (default 15443)
      --http-port PORT   egressd's proxy.transparent_http port (default 15080)
      --tls-dports LIST  destination ports sent to the TLS listener (default 443; e.g. 443,8443)
      --http-dports LIST destination ports sent to the HTTP listener (default 80)

Mode:
      --mode MODE        redirect (default; NAT redirect, egressd reads SO_ORIGINAL_DST) or
                         tproxy (tproxy statement; needs the policy routing below, set up here)
      --mark MARK        tproxy firewall mark (default 0x1e9)
      --table N          tproxy routing table (default 100)
  -6, --ipv6             also redirect IPv6 for interface and --local selectors (IPv6
                         --source CIDRs are always redirected)
      --exclude-uid UID  never redirect connections made by this user (name or number)

Exit status of `status`: 0 when the table is installed, 3 when it is not.
EOF
}

die() {
  printf 'nftables.sh: %s\n' "$*" >&2
  exit 2
}

cmd=${1:-}
[ -n "$cmd" ] || { usage >&2; exit 2; }
shift

sources=()
ifaces=()
tls_port=15443
http_port=15080
tls_dports=443
http_dports=80
mode=redirect
mark=0x1e9
table=100
ipv6=0
local_out=0
exclude_uid=""

while [ $# -gt 0 ]; do
  case "$1" in
    -s | --source) sources+=("${2:?--source needs a CIDR}"); shift 2 ;;
    -i | --iface) ifaces+=("${2:?--iface needs an interface}"); shift 2 ;;
    --local) local_out=1; shift ;;
    --tls-port) tls_port=${2:?}; shift 2 ;;
    --http-port) http_port=${2:?}; shift 2 ;;
    --tls-dports) tls_dports=${2:?}; shift 2 ;;
    --http-dports) http_dports=${2:?}; shift 2 ;;
    --mode) mode=${2:?}; shift 2 ;;
    --mark) mark=${2:?}; shift 2 ;;
    --table) table=${2:?}; shift 2 ;;
    -6 | --ipv6) ipv6=1; shift ;;
    --exclude-uid) exclude_uid=${2:?}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

is_port() { [[ $1 =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le 65535 ]; }
is_port_list() { [[ $1 =~ ^[0-9]+(,[0-9]+)*$ ]]; }

validate() {
  is_port "$tls_port" || die "--tls-port: not a port: $tls_port"
  is_port "$http_port" || die "--http-port: not a port: $http_port"
  is_port_list "$tls_dports" || die "--tls-dports: not a comma-separated port list: $tls_dports"
  is_port_list "$http_dports" || die "--http-dports: not a comma-separated port list: $http_dports"
  [[ $mark =~ ^(0x[0-9a-fA-F]+|[0-9]+)$ ]] || die "--mark: not a number: $mark"
  [[ $table =~ ^[0-9]+$ ]] || die "--table: not a number: $table"
  case "$mode" in redirect | tproxy) ;; *) die "--mode: redirect or tproxy, not $mode" ;; esac
  if [ ${#sources[@]} -eq 0 ] && [ ${#ifaces[@]} -eq 0 ] && [ "$local_out" = 0 ]; then
    die "setup needs --source CIDR, --iface IFACE or --local: redirecting every forwarded flow is never implied"
  fi
  if [ "$local_out" = 1 ]; then
    [ "$mode" = redirect ] || die "--local works in redirect mode only"
    [ -n "$exclude_uid" ] || die "--local needs --exclude-uid (egressd's user), or egressd's own connections loop back to it"
  fi
  local s
  for s in "${sources[@]}"; do
    [[ $s =~ ^[0-9A-Fa-f:.]+(/[0-9]+)?$ ]] || die "--source: not a CIDR: $s"
  done
  for s in "${ifaces[@]}"; do
    [[ $s =~ ^[A-Za-z0-9_.@-]+$ ]] || die "--iface: not an interface name: $s"
  done
  if [ -n "$exclude_uid" ]; then
    [[ $exclude_uid =~ ^[A-Za-z0-9_.-]+$ ]] || die "--exclude-uid: not a user: $exclude_uid"
  fi
}

command -v nft >/dev/null || die "nft not found (Debian/Ubuntu: apt-get install nftables)"

# "443,8443" -> "{ 443, 8443 }"
port_set() { echo "{ ${1//,/, } }"; }

# The `meta nfproto` restriction for selectors that are not family-specific.
family_match() { if [ "$ipv6" = 1 ]; then echo ""; else echo "meta nfproto ipv4 "; fi; }

# The jumps into the redirecting chain, one per selector.
selector_rules() {
  local s i fam
  fam=$(family_match)
  echo "    fib daddr type local return"
  for s in "${sources[@]}"; do
    if [[ $s == *:* ]]; then echo "    ip6 saddr $s meta l4proto tcp jump flows"; else echo "    ip saddr $s meta l4proto tcp jump flows"; fi
  done
  for i in "${ifaces[@]}"; do
    echo "    ${fam}iifname \"$i\" meta l4proto tcp jump flows"
  done
}

ruleset() {
  local tls http
  tls=$(port_set "$tls_dports")
  http=$(port_set "$http_dports")
  # Create-if-missing then delete: the transaction never fails on a missing table, and the
  # table is replaced in one step (no window without rules, no duplicate rules).
  echo "table inet $TABLE"
  echo "delete table inet $TABLE"
  echo "table inet $TABLE {"
  if [ "$mode" = redirect ]; then
    echo "  chain prerouting {"
    echo "    type nat hook prerouting priority dstnat; policy accept;"
    selector_rules
    echo "  }"
    if [ "$local_out" = 1 ]; then
      echo "  chain output {"
      echo "    type nat hook output priority -100; policy accept;"
      echo "    meta skuid $exclude_uid return"
      echo "    fib daddr type local return"
      echo "    $(family_match)meta l4proto tcp jump flows"
      echo "  }"
    fi
    echo "  chain flows {"
    echo "    tcp dport $tls redirect to :$tls_port"
    echo "    tcp dport $http redirect to :$http_port"
    echo "  }"
  else
    echo "  chain prerouting {"
    echo "    type filter hook prerouting priority mangle; policy accept;"
    # Packets of flows egressd already accepted: route them to the local socket.
    echo "    meta l4proto tcp socket transparent 1 meta mark set $mark accept"
    selector_rules
    echo "  }"
    echo "  chain flows {"
    echo "    meta nfproto ipv4 tcp dport $tls tproxy ip to :$tls_port meta mark set $mark accept"
    echo "    meta nfproto ipv4 tcp dport $http tproxy ip to :$http_port meta mark set $mark accept"
    echo "    meta nfproto ipv6 tcp dport $tls tproxy ip6 to :$tls_port meta mark set $mark accept"
    echo "    meta nfproto ipv6 tcp dport $http tproxy ip6 to :$http_port meta mark set $mark accept"
    echo "  }"
  fi
  echo "}"
}

# Policy routing for TPROXY: marked packets are delivered locally.
routing_setup() {
  local fam any
  for fam in 4 6; do
    any=0.0.0.0/0
    [ "$fam" = 6 ] && any=::/0
    while ip "-$fam" rule del fwmark "$mark" lookup "$table" 2>/dev/null; do :; done
    ip "-$fam" rule add fwmark "$mark" lookup "$table"
    ip "-$fam" route replace local "$any" dev lo table "$table"
  done
}

routing_teardown() {
  local fam any
  for fam in 4 6; do
    any=0.0.0.0/0
    [ "$fam" = 6 ] && any=::/0
    while ip "-$fam" rule del fwmark "$mark" lookup "$table" 2>/dev/null; do :; done
    ip "-$fam" route del local "$any" dev lo table "$table" 2>/dev/null || true
  done
}

setup() {
  validate
  ruleset | nft -f -
  if [ "$mode" = tproxy ]; then routing_setup; else routing_teardown; fi
  echo "egressd transparent redirection installed ($mode; TLS -> :$tls_port, HTTP -> :$http_port)"
}

teardown() {
  if nft list table inet "$TABLE" >/dev/null 2>&1; then
    nft delete table inet "$TABLE"
  fi
  routing_teardown
  echo "egressd transparent redirection removed"
}

status() {
  local found=3 fam
  if nft list table inet "$TABLE" 2>/dev/null; then found=0; fi
  for fam in 4 6; do
    # No `grep -q`: with pipefail, its early exit would fail the pipeline on SIGPIPE.
    if ip "-$fam" rule show 2>/dev/null | grep -E "fwmark $mark lookup $table( |$)" >/dev/null; then
      echo "# IPv$fam policy routing (TPROXY)"
      ip "-$fam" rule show | grep -E "fwmark $mark lookup $table( |$)"
      ip "-$fam" route show table "$table" 2>/dev/null || true
    fi
  done
  echo "# net.ipv4.ip_forward = $(cat /proc/sys/net/ipv4/ip_forward 2>/dev/null || echo '?')"
  if [ "$found" != 0 ]; then echo "egressd transparent redirection: not installed"; fi
  return "$found"
}

case "$cmd" in
  setup) setup ;;
  teardown) teardown ;;
  status) status ;;
  -h | --help | help) usage ;;
  *) usage >&2; exit 2 ;;
esac
