#!/usr/bin/env bash
# Build (once) the read-only root filesystem shared by every lab node:
# Debian 12 minbase + systemd + iptables + python3 and a salt-minion 3008.4 venv.
# Idempotent: a finished rootfs is marked with .complete and reused.
set -euo pipefail
CACHE=${LAB_CACHE:-/var/cache/apigee-mtls-lab}
ROOTFS="$CACHE/rootfs"
SALT_VERSION=${SALT_VERSION:-3008.4}
# the Debian packages of every node; iperf3, sockperf, nginx (an event-driven HTTP server: no
# fork per connection) and apache2-utils (`ab`: one connection per request without -k) are the
# native endpoints of `make bench` (mesh against direct). A changed list builds a new rootfs.
PACKAGES=systemd,systemd-sysv,dbus,iproute2,iptables,python3,python3-venv,ca-certificates,procps,netcat-openbsd,tcpdump,less,iperf3,sockperf,nginx,apache2-utils
STAMP="$ROOTFS/.complete-salt-$SALT_VERSION-$(printf %s "$PACKAGES" | sha256sum | cut -c1-12)"
[ -e "$STAMP" ] && { echo "rootfs: cached at $ROOTFS"; exit 0; }

mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}

mkdir -p "$CACHE"
if [ ! -e "$ROOTFS.tmp/.debootstrap-done" ]; then
rm -rf "$ROOTFS.tmp"
echo "rootfs: debootstrap bookworm from $mirror"
debootstrap --variant=minbase \
  --include="$PACKAGES" \
  bookworm "$ROOTFS.tmp" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
  || { tail -20 "$CACHE/debootstrap.log"; exit 1; }
touch "$ROOTFS.tmp/.debootstrap-done"
fi

echo "rootfs: salt-minion $SALT_VERSION venv (wheels built on the host: no compiler in the nodes)"
WHEELS="$CACHE/wheels-salt-$SALT_VERSION"
if [ ! -e "$WHEELS/.complete" ]; then
  rm -rf "$WHEELS"
  python3 -m pip wheel -q -w "$WHEELS" "salt==$SALT_VERSION" py-consul cryptography >"$CACHE/pip.log" 2>&1 \
    || { grep -v '^WARNING: Location' "$CACHE/pip.log" | tail -20; exit 1; }
  touch "$WHEELS/.complete"
fi
rm -rf "$ROOTFS.tmp/tmp/wheels" && cp -r "$WHEELS" "$ROOTFS.tmp/tmp/wheels"
chroot "$ROOTFS.tmp" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root sh -c "
  rm -rf /opt/salt && python3 -m venv /opt/salt &&
  /opt/salt/bin/pip install -q --no-index --find-links /tmp/wheels 'salt==$SALT_VERSION' py-consul cryptography
" >"$CACHE/pip-chroot.log" 2>&1 || { tail -20 "$CACHE/pip-chroot.log"; exit 1; }
rm -rf "$ROOTFS.tmp/tmp/wheels"
for b in salt-minion salt-call; do ln -sf /opt/salt/bin/$b "$ROOTFS.tmp/usr/local/bin/$b"; done

cat >"$ROOTFS.tmp/etc/systemd/system/salt-minion.service" <<'UNIT'
[Unit]
Description=Salt minion (lab)
After=network-online.target systemd-networkd.service
Wants=network-online.target
[Service]
ExecStart=/opt/salt/bin/salt-minion
KillMode=process
Restart=on-failure
RestartSec=2
[Install]
WantedBy=multi-user.target
UNIT
chroot "$ROOTFS.tmp" systemctl enable salt-minion.service systemd-networkd.service >/dev/null 2>&1
# quiet, fast boots: nothing the lab does not need
# (nginx runs only when `make bench` starts it)
for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer nginx.service; do
  chroot "$ROOTFS.tmp" systemctl disable "$u" >/dev/null 2>&1 || true
done
rm -f "$ROOTFS.tmp/etc/machine-id"   # each node gets its own
rm -f "$ROOTFS.tmp/etc/resolv.conf"
echo "nameserver 127.0.0.1" >"$ROOTFS.tmp/etc/resolv.conf"
rm -rf "$ROOTFS.tmp/var/cache/apt/archives/"*.deb
rm -rf "$ROOTFS"
mv "$ROOTFS.tmp" "$ROOTFS"
touch "$STAMP"
echo "rootfs: ready at $ROOTFS ($(du -sh "$ROOTFS" | cut -f1))"
