#!/bin/sh
# Managed by Salt (apigee_mtls). The formula's iptables and ip6tables chains, and only those.
#   apply   create/flush+fill APIGEE-MTLS-OUT (nat) and APIGEE-MTLS-IN (filter) atomically from
#           the rules file (iptables-restore --noflush), then make sure each is jumped to once,
#           first in OUTPUT / INPUT. Then the same over IPv6 from the IPv6 rules file: filter
#           APIGEE-MTLS-IN (first in INPUT) and APIGEE-MTLS-OUT (first in OUTPUT). Without the
#           IPv6 rules file (apigee_mtls:firewall:ipv6 false) the formula's own IPv6 chains, if
#           an earlier run made them, are removed; nothing else in ip6tables is touched.
#   remove  delete the jumps and the chains, IPv4 and IPv6 (INPUT/OUTPUT are left as before)
# A host without IPv6 (no /proc/net/if_inet6, or net.ipv6.conf.all.disable_ipv6=1) or without
# ip6tables skips the IPv6 part of apply; that is never an error.
set -eu
RULES=${APIGEE_MTLS_RULES:-/etc/apigee-mtls/iptables.rules}
# set but empty: no IPv6 rules (the state passes its arguments here)
RULES6=${APIGEE_MTLS_RULES6-/etc/apigee-mtls/ip6tables.rules}
IPT="iptables -w"
IP6T="ip6tables -w"

jump() { # command table chain parent
  $1 -t "$2" -C "$4" -j "$3" 2>/dev/null || $1 -t "$2" -I "$4" 1 -j "$3"
}

unjump() { # command table chain parent: every jump, then the chain itself
  while $1 -t "$2" -C "$4" -j "$3" 2>/dev/null; do $1 -t "$2" -D "$4" -j "$3"; done
  if $1 -t "$2" -S "$3" >/dev/null 2>&1; then $1 -t "$2" -F "$3"; $1 -t "$2" -X "$3"; fi
}

has_ip6tables() {
  command -v ip6tables >/dev/null 2>&1 && command -v ip6tables-restore >/dev/null 2>&1
}

ipv6_on() {
  [ -e /proc/net/if_inet6 ] || return 1
  [ "$(cat /proc/sys/net/ipv6/conf/all/disable_ipv6 2>/dev/null || echo 0)" != 1 ] || return 1
  has_ip6tables
}

remove6() {
  has_ip6tables || return 0
  unjump "$IP6T" filter APIGEE-MTLS-IN INPUT
  unjump "$IP6T" filter APIGEE-MTLS-OUT OUTPUT
}

apply6() {
  if ! ipv6_on; then
    echo "apigee-mtls-firewall: IPv6 skipped (disabled on this host or no ip6tables)" >&2
    return 0
  fi
  if [ -z "$RULES6" ] || [ ! -e "$RULES6" ]; then
    remove6
    return 0
  fi
  ip6tables-restore -w --noflush <"$RULES6"
  jump "$IP6T" filter APIGEE-MTLS-IN INPUT
  jump "$IP6T" filter APIGEE-MTLS-OUT OUTPUT
}

case "${1:-}" in
apply)
  iptables-restore -w --noflush <"$RULES"
  jump "$IPT" nat APIGEE-MTLS-OUT OUTPUT
  jump "$IPT" filter APIGEE-MTLS-IN INPUT
  apply6
  ;;
remove)
  unjump "$IPT" nat APIGEE-MTLS-OUT OUTPUT
  unjump "$IPT" filter APIGEE-MTLS-IN INPUT
  remove6
  ;;
*)
  echo "usage: $0 apply|remove" >&2
  exit 2
  ;;
esac
