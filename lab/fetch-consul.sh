#!/usr/bin/env bash
# Fetch Consul 1.8.7 from Debian 11 (bullseye) without touching the system's apt
# sources: a private sources list + private state dir, `apt-get download`, `dpkg -x`.
# Result: $CACHE/consul/consul (static binary) and its sha256 in consul.sha256.
set -euo pipefail
CACHE=${LAB_CACHE:-/var/cache/apigee-mtls-lab}
OUT="$CACHE/consul"
if [ -x "$OUT/consul" ] && [ -s "$OUT/consul.sha256" ]; then
  echo "consul: cached $("$OUT/consul" version | head -1)"; exit 0
fi
mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
work="$CACHE/apt-bullseye"
mkdir -p "$work/lists/partial" "$work/archives/partial" "$OUT"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bullseye main" >"$work/sources.list"
opts=(-q -oDir::Etc::SourceList="$work/sources.list" -oDir::Etc::SourceParts=/dev/null
      -oDir::State::Lists="$work/lists" -oDir::Cache::Archives="$work/archives"
      -oDir::Cache="$work" -oAPT::Get::List-Cleanup=0)
apt-get "${opts[@]}" update >/dev/null
(cd "$work" && rm -f consul_*.deb && apt-get "${opts[@]}" download consul >/dev/null)
deb=$(ls "$work"/consul_1.8.7*.deb)
rm -rf "$work/x" && dpkg -x "$deb" "$work/x"
install -m 0755 "$work/x/usr/bin/consul" "$OUT/consul"
cp "$deb" "$OUT/"
(cd "$OUT" && sha256sum consul | cut -d' ' -f1 >consul.sha256)
echo "consul: $("$OUT/consul" version | head -1) sha256=$(cat "$OUT/consul.sha256")"
