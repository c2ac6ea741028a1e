#!/usr/bin/env bash
# Test "hosts" for migration between hosts: network namespaces joined by a bridge.
#
#   scripts/testhosts.sh up     [--hosts N] [--rate RATE] [--prefix P] [--subnet K]
#   scripts/testhosts.sh shape  --rate RATE|none [--prefix P]
#   scripts/testhosts.sh status [--prefix P]
#   scripts/testhosts.sh down   [--prefix P]
#
# Layout (prefix P, default "vmem"; subnet index K, default 0; N hosts, default 2, max 3):
#
#   netns P-h1: lo, eth0 10.213.K.1/24 ─┐ veth
#   netns P-h2: lo, eth0 10.213.K.2/24 ─┤        netns P-sw: bridge br0 (ports p1..pN)
#   netns P-hN: ...                    ─┘
#
# The bridge lives in its own namespace, so nothing is added to the root namespace: no
# interface, no address, no route; the 10.213.K.x addresses exist only inside P-h1..P-hN.
# `--rate` (tc syntax: 1gbit, 100mbit, 500kbit) shapes each host's eth0 egress with an HTB
# class, i.e. both directions of every host-to-host path.  Run a program on a host with
#   ip netns exec P-h1 COMMAND...
# `up` first removes a previous set with the same prefix; `down` is idempotent and removes
# every namespace (and with it every veth and the bridge) of the prefix.  Needs root and
# iproute2 (ip, tc).
set -euo pipefail

usage() {
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

die() {
  echo "testhosts: $*" >&2
  exit 1
}

cmd=${1:-}
[ -n "$cmd" ] || usage
shift
hosts=2
rate=""
prefix=vmem
subnet=0
while [ $# -gt 0 ]; do
  case "$1" in
    --hosts) hosts=${2:?--hosts needs a number}; shift 2 ;;
    --rate) rate=${2:?--rate needs a value, e.g. 1gbit}; shift 2 ;;
    --prefix) prefix=${2:?--prefix needs a name}; shift 2 ;;
    --subnet) subnet=${2:?--subnet needs a number 0..255}; shift 2 ;;
    -h|--help) usage ;;
    *) echo "testhosts: unknown argument $1" >&2; usage ;;
  esac
done

[[ $hosts =~ ^[1-3]$ ]] || die "--hosts must be 1, 2 or 3, got '$hosts'"
[[ $subnet =~ ^[0-9]{1,3}$ ]] && [ "$subnet" -le 255 ] || die "--subnet must be 0..255, got '$subnet'"
# Namespace names become file names under /run/netns: keep them short and plain.
[[ $prefix =~ ^[A-Za-z0-9_]([A-Za-z0-9_-]{0,23})$ ]] || die "--prefix must be 1-24 of [A-Za-z0-9_-], got '$prefix'"
if [ -n "$rate" ] && [ "$rate" != none ]; then
  [[ $rate =~ ^[0-9]+(\.[0-9]+)?([kKmMgG]?(bit|bps))$ ]] || die "--rate must look like 1gbit, 100mbit or 500kbit, got '$rate'"
fi

need_root() {
  [ "$(id -u)" = 0 ] || die "must run as root (network namespaces)"
  command -v ip >/dev/null || die "iproute2 'ip' not found (apt-get install iproute2)"
}

sw="${prefix}-sw"
host_ns() { echo "${prefix}-h$1"; }

# Namespaces of this prefix that exist now (only exact P-sw / P-hN names).
our_namespaces() {
  ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${prefix}-(sw|h[0-9]+)\$" || true
}

shape_host() {  # shape_host NS RATE|none
  local ns=$1 r=$2
  tc -n "$ns" qdisc del dev eth0 root 2>/dev/null || true
  if [ "$r" != none ] && [ -n "$r" ]; then
    tc -n "$ns" qdisc add dev eth0 root handle 1: htb default 10
    # veth sends GSO packets of up to 64 KiB: the burst must hold several of them or HTB
    # undershoots the rate; an explicit quantum avoids HTB's "quantum is big" warning.
    tc -n "$ns" class add dev eth0 parent 1: classid 1:10 htb rate "$r" ceil "$r" \
      burst 256k cburst 256k quantum 60000
  fi
}

do_down() {
  local ns pids
  for ns in $(our_namespaces); do
    pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
    if [ -n "$pids" ]; then
      # Not killed here: they are somebody's processes. The namespace disappears from
      # `ip netns list` now and from the kernel once they exit.
      echo "testhosts: warning: processes still in $ns: $pids" >&2
    fi
    ip netns del "$ns" 2>/dev/null || true
  done
}

do_up() {
  do_down
  # On any failure part-way, leave nothing behind.
  trap 'do_down' ERR
  ip netns add "$sw"
  ip -n "$sw" link set lo up
  ip -n "$sw" link add br0 type bridge
  ip -n "$sw" link set br0 up
  local i ns
  for i in $(seq 1 "$hosts"); do
    ns=$(host_ns "$i")
    ip netns add "$ns"
    # Created inside the switch namespace, peer moved straight into the host namespace:
    # the pair never appears in the root namespace.
    ip -n "$sw" link add "p$i" type veth peer name eth0 netns "$ns"
    ip -n "$sw" link set "p$i" master br0
    ip -n "$sw" link set "p$i" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "10.213.${subnet}.${i}/24" dev eth0
    ip -n "$ns" link set eth0 up
    if [ -n "$rate" ] && [ "$rate" != none ]; then
      shape_host "$ns" "$rate"
    fi
  done
  trap - ERR
  echo "testhosts: up: $hosts hosts ${prefix}-h1..${prefix}-h${hosts} on 10.213.${subnet}.0/24${rate:+, rate $rate}"
}

do_shape() {
  [ -n "$rate" ] || die "shape needs --rate RATE (or --rate none)"
  local ns found=0
  for ns in $(our_namespaces); do
    case "$ns" in
      *-sw) ;;
      *) shape_host "$ns" "$rate"; found=1 ;;
    esac
  done
  [ "$found" = 1 ] || die "no test hosts with prefix '$prefix' (run: $0 up --prefix $prefix)"
}

do_status() {
  local ns any=0
  for ns in $(our_namespaces); do
    any=1
    case "$ns" in
      *-sw) echo "$ns: bridge br0 ports: $(ip -n "$ns" -o link show master br0 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | tr '\n' ' ')" ;;
      *)
        echo "$ns: $(ip -n "$ns" -o -4 addr show dev eth0 2>/dev/null | awk '{print $4}')" \
             "qdisc: $(tc -n "$ns" qdisc show dev eth0 2>/dev/null | head -1)"
        tc -n "$ns" class show dev eth0 2>/dev/null | sed 's/^/    /' ;;
    esac
  done
  [ "$any" = 1 ] || echo "testhosts: no test hosts with prefix '$prefix'"
}

need_root
case "$cmd" in
  up) do_up ;;
  down) do_down ;;
  shape) do_shape ;;
  status) do_status ;;
  *) usage ;;
esac
