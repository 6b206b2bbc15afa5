#!/bin/sh
# Managed by Salt (apigee_mtls). The formula's iptables chains, and only those.
#   apply   create/flush+fill APIGEE-MTLS-OUT (nat) and APIGEE-MTLS-IN (filter) atomically from
#           the rules file (iptables-restore --noflush), then make sure each is jumped to once,
#           first in OUTPUT / INPUT
#   remove  delete the jumps and the chains (OUTPUT and INPUT are left as before)
set -eu
RULES=${APIGEE_MTLS_RULES:-/etc/apigee-mtls/iptables.rules}
IPT="iptables -w"

jump() { # table chain parent
  $IPT -t "$1" -C "$3" -j "$2" 2>/dev/null || $IPT -t "$1" -I "$3" 1 -j "$2"
}

case "${1:-}" in
apply)
  iptables-restore -w --noflush <"$RULES"
  jump nat APIGEE-MTLS-OUT OUTPUT
  jump filter APIGEE-MTLS-IN INPUT
  ;;
remove)
  for spec in "nat APIGEE-MTLS-OUT OUTPUT" "filter APIGEE-MTLS-IN INPUT"; do
    set -- $spec
    while $IPT -t "$1" -C "$3" -j "$2" 2>/dev/null; do $IPT -t "$1" -D "$3" -j "$2"; done
    if $IPT -t "$1" -S "$2" >/dev/null 2>&1; then $IPT -t "$1" -F "$2"; $IPT -t "$1" -X "$2"; fi
  done
  ;;
*)
  echo "usage: $0 apply|remove" >&2
  exit 2
  ;;
esac
