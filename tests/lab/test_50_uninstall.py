"""Uninstall: `state.apply apigee_mtls.clean` removes proxies, agents, units, config,
certificates, the formula's chains (nat OUTPUT as before) and the consul user; components are
reachable directly again; a second clean changes nothing; the formula installs again."""
from conftest import state_summary

LEFTOVERS = r"""
for p in /etc/consul.d /etc/apigee-mtls /var/lib/consul /usr/local/bin/consul \
         /etc/systemd/system/consul.service /etc/systemd/system/apigee-mtls-proxy@.service \
         /etc/systemd/system/apigee-mtls-firewall.service /usr/local/sbin/apigee-mtls-firewall; do
  [ -e "$p" ] && echo "file $p"
done
# a name systemd still knows without a unit file, inactive ("not-found inactive dead", like
# home.mount on any Debian) is bookkeeping, not an installed unit; anything else is a leftover
systemctl list-units --all --no-legend --plain 'consul*' 'apigee-mtls*' 'system-apigee*' \
  | grep -v 'not-found *inactive *dead' | sed 's/^/unit /'
pgrep -x consul >/dev/null && echo "process consul"
getent passwd consul >/dev/null && echo "user consul"
getent group consul >/dev/null && echo "group consul"
iptables -w -t nat -S OUTPUT | grep -v '^-P' | sed 's/^/nat /'
iptables -w -S INPUT | grep -v '^-P' | sed 's/^/filter /'
iptables -w -t nat -S APIGEE-MTLS-OUT >/dev/null 2>&1 && echo "chain APIGEE-MTLS-OUT"
iptables -w -S APIGEE-MTLS-IN >/dev/null 2>&1 && echo "chain APIGEE-MTLS-IN"
true
"""


def test_clean_removes_everything_and_components_are_direct_again(applied):
    lab = applied
    ret = lab.apply("*", "apigee_mtls.clean")
    summary = state_summary(ret)
    assert all(not s["failed"] for s in summary.values()), summary
    for node in lab.nodes:
        left = lab.run(node, LEFTOVERS).stdout.strip()
        assert left == "", f"{node} keeps: {left}"
    # plaintext straight to the component again (no redirect, no refusal)
    r = lab.requests("n4", [(lab.ip["n2"], 8081, "direct-after-clean")])[0]
    assert r.get("node") == "n2" and r["peer"].startswith(lab.ip["n4"] + ":"), r
    again = state_summary(lab.apply("*", "apigee_mtls.clean"))
    assert all(not s["changed"] and not s["failed"] for s in again.values()), again


def test_reinstall_after_clean(applied):
    lab = applied
    summary = state_summary(lab.apply())
    assert all(not s["failed"] for s in summary.values()), summary
    lab.wait_mesh_ready()
    r = lab.requests("n1", [(lab.ip["n2"], 8081, "mesh-again")])[0]
    assert r.get("node") == "n2" and r["peer"].startswith("127.0.0.1:"), r
