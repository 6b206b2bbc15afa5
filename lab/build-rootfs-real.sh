#!/usr/bin/env bash
# Build (once) the rootfs of `make lab COMPONENTS=real`: the lab's rootfs (lab/build-rootfs.sh)
# plus the real open-source datastores Apigee Edge runs, from Debian 12: ZooKeeper 3.8
# (zookeeperd), PostgreSQL 15 and OpenLDAP (slapd, ldap-utils). Their services are disabled:
# the lab configures and starts them (lab/real.py). Idempotent: a finished rootfs is marked and
# reused; a changed package list builds a new one.
set -euo pipefail
CACHE=${LAB_CACHE:-/var/cache/apigee-mtls-lab}
BASE="$CACHE/rootfs"
ROOTFS="$CACHE/rootfs-real"
REAL_PACKAGES="zookeeperd postgresql-15 slapd ldap-utils"
SERVICES="zookeeper.service postgresql.service slapd.service"
base_stamp=$(find "$BASE" -maxdepth 1 -name ".complete-*" -printf "%f\n" 2>/dev/null | head -1 || true)
[ -n "$base_stamp" ] || { echo "rootfs-real: the base rootfs is not built (lab/build-rootfs.sh)"; exit 1; }
STAMP="$ROOTFS/.complete-real-$(printf %s "$base_stamp $REAL_PACKAGES" | sha256sum | cut -c1-12)"
[ -e "$STAMP" ] && { echo "rootfs-real: cached at $ROOTFS"; exit 0; }

tmp="$ROOTFS.tmp"
cleanup() {
  for m in dev/pts dev sys proc; do mountpoint -q "$tmp/$m" && umount -l "$tmp/$m"; done
  return 0
}
trap cleanup EXIT
cleanup
rm -rf "$tmp"
echo "rootfs-real: copy of $BASE + $REAL_PACKAGES"
cp -a "$BASE" "$tmp"
rm -f "$tmp"/.complete-*
# apt in the chroot uses the host's network: the host's resolver and apt settings (a dated
# mirror needs Check-Valid-Until false), restored afterwards
cp "$tmp/etc/resolv.conf" "$tmp/etc/resolv.conf.lab"
cp -L /etc/resolv.conf "$tmp/etc/resolv.conf"
for f in /etc/apt/apt.conf.d/99*; do [ -e "$f" ] && cp "$f" "$tmp/etc/apt/apt.conf.d/"; done
mount -t proc proc "$tmp/proc"
mount --rbind /sys "$tmp/sys"
mount --bind /dev "$tmp/dev"
mount --bind /dev/pts "$tmp/dev/pts"
# no service starts inside the chroot (invoke-rc.d asks policy-rc.d)
printf '#!/bin/sh\nexit 101\n' >"$tmp/usr/sbin/policy-rc.d"
chmod 0755 "$tmp/usr/sbin/policy-rc.d"
chroot "$tmp" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root DEBIAN_FRONTEND=noninteractive \
  sh -c "apt-get -q update && apt-get -q install -y --no-install-recommends $REAL_PACKAGES" \
  >"$CACHE/rootfs-real.log" 2>&1 || { tail -30 "$CACHE/rootfs-real.log"; exit 1; }
rm -f "$tmp/usr/sbin/policy-rc.d"
cleanup
for s in $SERVICES; do chroot "$tmp" systemctl disable "$s" >/dev/null 2>&1 || true; done
mv "$tmp/etc/resolv.conf.lab" "$tmp/etc/resolv.conf"
rm -f "$tmp"/etc/apt/apt.conf.d/99*
rm -rf "$tmp/var/cache/apt/archives/"*.deb "$tmp/var/lib/apt/lists/"*_Packages* 2>/dev/null || true
rm -rf "$ROOTFS"
mv "$tmp" "$ROOTFS"
touch "$STAMP"
echo "rootfs-real: ready at $ROOTFS ($(du -sh "$ROOTFS" | cut -f1))"
