#!/usr/bin/env bash
# Redirects client TCP traffic to egressd's transparent listeners with iptables.
#
#   iptables.sh setup    --source 10.0.0.0/16 [--iface eth1] [options]
#   iptables.sh teardown [--mark MARK --table N]
#   iptables.sh status
#
# Everything lives in a dedicated chain, EGRESSD_TRANSPARENT (table nat for REDIRECT, table
# mangle for TPROXY), reached from PREROUTING (and OUTPUT with --local) by jumps tagged with
# the comment "egressd-transparent". `setup` rebuilds the chain and the jumps from scratch
# every time, so running it twice leaves exactly one set of rules; `teardown` removes the
# jumps, the chains and the TPROXY routing. See README.md next to this script.
set -euo pipefail

readonly CHAIN=EGRESSD_TRANSPARENT
readonly TAG=egressd-transparent

usage() {
  cat <<'EOF'
Usage: iptables.sh setup|teardown|status [options]

Selectors (setup needs at least one, or --local):
  -s, --source CIDR      redirect traffic from this client subnet (repeatable; IPv4 or IPv6)
  -i, --iface IFACE      redirect traffic arriving on this interface (repeatable)
      --local            also redirect connections made on this host (nat OUTPUT; REDIRECT
                         mode only); requires --exclude-uid so egressd's own connections are
                         never redirected back to egressd

Ports:
      --tls-port PORT    egressd's proxy.transparent_tls port (default 15443)
      --http-port PORT   egressd's proxy.transparent_http port (default 15080)
      --tls-dports LIST  destination ports sent to the TLS listener (default 443; e.g. 443,8443)
      --http-dports LIST destination ports sent to the HTTP listener (default 80)

Mode:
      --mode MODE        redirect (default; NAT REDIRECT, egressd reads SO_ORIGINAL_DST) or
                         tproxy (mangle TPROXY; needs the policy routing below, set up here)
      --mark MARK        tproxy firewall mark (default 0x1e9)
      --table N          tproxy routing table (default 100)
  -6, --ipv6             also install the rules with ip6tables (interface and --local
                         selectors; IPv6 --source CIDRs always go to ip6tables)
      --exclude-uid UID  never redirect connections made by this user (name or number)

Exit status of `status`: 0 when the chain is installed, 3 when it is not.
EOF
}

die() {
  printf 'iptables.sh: %s\n' "$*" >&2
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
}

command -v iptables >/dev/null || die "iptables not found (Debian/Ubuntu: apt-get install iptables)"

# The families to work on: "4", and "6" with --ipv6 or an IPv6 source.
families() {
  echo 4
  local s v6=$ipv6
  for s in "${sources[@]}"; do [[ $s == *:* ]] && v6=1; done
  if [ "$v6" = 1 ]; then echo 6; fi
}

ipt() {
  local fam=$1
  shift
  if [ "$fam" = 6 ]; then ip6tables -w "$@"; else iptables -w "$@"; fi
}

# The TPROXY mode works in table mangle, REDIRECT in table nat.
table_of() { if [ "$mode" = tproxy ]; then echo mangle; else echo nat; fi; }

chain_exists() { ipt "$1" -t "$2" -S "$CHAIN" >/dev/null 2>&1; }

# Deletes every rule of built-in chain $3 (table $2) that jumps to our chain.
remove_jumps() {
  local fam=$1 tbl=$2 builtin=$3 line
  local -a rule
  # `iptables -S` prints rules in the syntax that created them; "-A" becomes "-D". Our jumps
  # carry no argument with spaces, so word splitting is exact.
  while read -r line; do
    read -r -a rule <<<"$line"
    rule[0]=-D
    ipt "$fam" -t "$tbl" "${rule[@]}"
  done < <(ipt "$fam" -t "$tbl" -S "$builtin" 2>/dev/null | grep -E -- "-j $CHAIN( |$)" || true)
}

remove_chain() {
  local fam=$1 tbl=$2
  remove_jumps "$fam" "$tbl" PREROUTING
  if [ "$tbl" = nat ]; then remove_jumps "$fam" "$tbl" OUTPUT; fi
  if chain_exists "$fam" "$tbl"; then
    ipt "$fam" -t "$tbl" -F "$CHAIN"
    ipt "$fam" -t "$tbl" -X "$CHAIN"
  fi
}

# Fills our chain: what to leave alone, then the redirections.
fill_chain() {
  local fam=$1 tbl=$2
  ipt "$fam" -t "$tbl" -A "$CHAIN" -m addrtype --dst-type LOCAL -j RETURN
  if [ "$mode" = redirect ]; then
    ipt "$fam" -t nat -A "$CHAIN" -p tcp -m multiport --dports "$tls_dports" -j REDIRECT --to-ports "$tls_port"
    ipt "$fam" -t nat -A "$CHAIN" -p tcp -m multiport --dports "$http_dports" -j REDIRECT --to-ports "$http_port"
  else
    # Packets of flows egressd already accepted: route them to the local socket.
    ipt "$fam" -t mangle -A "$CHAIN" -p tcp -m socket --transparent -j MARK --set-mark "$mark/$mark"
    ipt "$fam" -t mangle -A "$CHAIN" -m mark --mark "$mark/$mark" -j RETURN
    ipt "$fam" -t mangle -A "$CHAIN" -p tcp -m multiport --dports "$tls_dports" \
      -j TPROXY --on-port "$tls_port" --tproxy-mark "$mark/$mark"
    ipt "$fam" -t mangle -A "$CHAIN" -p tcp -m multiport --dports "$http_dports" \
      -j TPROXY --on-port "$http_port" --tproxy-mark "$mark/$mark"
  fi
}

add_jumps() {
  local fam=$1 tbl=$2 s i
  local -a uid=()
  if [ -n "$exclude_uid" ]; then uid=(-m owner ! --uid-owner "$exclude_uid"); fi
  for s in "${sources[@]}"; do
    # An IPv4 CIDR goes to iptables only, an IPv6 one to ip6tables only.
    if [[ $s == *:* ]] && [ "$fam" = 4 ]; then continue; fi
    if [[ $s != *:* ]] && [ "$fam" = 6 ]; then continue; fi
    ipt "$fam" -t "$tbl" -A PREROUTING -s "$s" -p tcp -m comment --comment "$TAG" -j "$CHAIN"
  done
  for i in "${ifaces[@]}"; do
    ipt "$fam" -t "$tbl" -A PREROUTING -i "$i" -p tcp -m comment --comment "$TAG" -j "$CHAIN"
  done
  if [ "$local_out" = 1 ]; then
    ipt "$fam" -t nat -A OUTPUT -p tcp "${uid[@]}" -m comment --comment "$TAG" -j "$CHAIN"
  fi
}

ipr() {
  local fam=$1
  shift
  ip "-$fam" "$@"
}

# Policy routing for TPROXY: marked packets are delivered locally.
routing_setup() {
  local fam=$1 any=0.0.0.0/0
  [ "$fam" = 6 ] && any=::/0
  while ipr "$fam" rule del fwmark "$mark/$mark" lookup "$table" 2>/dev/null; do :; done
  ipr "$fam" rule add fwmark "$mark/$mark" lookup "$table"
  ipr "$fam" route replace local "$any" dev lo table "$table"
}

routing_teardown() {
  local fam=$1 any=0.0.0.0/0
  [ "$fam" = 6 ] && any=::/0
  while ipr "$fam" rule del fwmark "$mark/$mark" lookup "$table" 2>/dev/null; do :; done
  ipr "$fam" route del local "$any" dev lo table "$table" 2>/dev/null || true
}

setup() {
  validate
  local fam tbl
  local -a fams
  tbl=$(table_of)
  mapfile -t fams < <(families)
  for fam in "${fams[@]}"; do
    # From scratch: both modes' chains and jumps go, then this mode's are added.
    remove_chain "$fam" nat
    remove_chain "$fam" mangle
    ipt "$fam" -t "$tbl" -N "$CHAIN"
    fill_chain "$fam" "$tbl"
    add_jumps "$fam" "$tbl"
    if [ "$mode" = tproxy ]; then routing_setup "$fam"; else routing_teardown "$fam"; fi
  done
  echo "egressd transparent redirection installed ($mode; TLS -> :$tls_port, HTTP -> :$http_port)"
}

teardown() {
  local fam
  for fam in 4 6; do
    if [ "$fam" = 6 ] && ! command -v ip6tables >/dev/null; then continue; fi
    remove_chain "$fam" nat
    remove_chain "$fam" mangle
    routing_teardown "$fam"
  done
  echo "egressd transparent redirection removed"
}

status() {
  local fam tbl found=1
  for fam in 4 6; do
    if [ "$fam" = 6 ] && ! command -v ip6tables >/dev/null; then continue; fi
    for tbl in nat mangle; do
      if chain_exists "$fam" "$tbl"; then
        found=0
        echo "# IPv$fam table $tbl"
        ipt "$fam" -t "$tbl" -S PREROUTING | grep -E -- "-j $CHAIN( |$)" || true
        if [ "$tbl" = nat ]; then ipt "$fam" -t nat -S OUTPUT | grep -E -- "-j $CHAIN( |$)" || true; fi
        ipt "$fam" -t "$tbl" -S "$CHAIN"
      fi
    done
    # No `grep -q`: with pipefail, its early exit would fail the pipeline on SIGPIPE.
    if ipr "$fam" rule show 2>/dev/null | grep -E "fwmark $mark/$mark lookup $table( |$)" >/dev/null; then
      echo "# IPv$fam policy routing (TPROXY)"
      ipr "$fam" rule show | grep -E "fwmark $mark/$mark lookup $table( |$)"
      ipr "$fam" route show table "$table" 2>/dev/null || true
    fi
  done
  echo "# net.ipv4.ip_forward = $(cat /proc/sys/net/ipv4/ip_forward 2>/dev/null || echo '?')"
  if [ "$found" = 1 ]; then echo "egressd transparent redirection: not installed"; fi
  return $((found * 3))
}

case "$cmd" in
  setup) setup ;;
  teardown) teardown ;;
  status) status ;;
  -h | --help | help) usage ;;
  *) usage >&2; exit 2 ;;
esac
