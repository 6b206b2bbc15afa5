"""Uninstall: `state.apply apigee_mtls.clean` removes proxies, agents, units, config,
certificates, the formula's chains (nat OUTPUT as before; IPv6 too) and the consul user; components are
reachable directly again; a second clean changes nothing; the formula installs again."""
import json
import re
import subprocess
import time

from conftest import labctl, orchestrate_rollout, planner, state_summary

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
# IPv6: no chain or rule of the formula anywhere, INPUT/OUTPUT as on a fresh node (empty)
ip6tables-save | grep APIGEE-MTLS | sed 's/^/ip6 /'
ip6tables -w -S INPUT | grep -v '^-P' | sed 's/^/ip6 filter /'
ip6tables -w -S OUTPUT | grep -v '^-P' | sed 's/^/ip6 filter /'
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


# New connections, one after another, to every remote upstream of the node (a component
# that keeps connecting while the mesh is rolled out under it); runs until /tmp/traffic.stop
# exists, then prints per-target counts, the failures, and the path of the last reply.
TRAFFIC = r"""
import json, os, socket, sys, time
targets = json.loads(sys.argv[1])
stats = {f"{ip}:{port}": {"ok": 0, "failed": 0, "errors": [], "last_peer": None}
         for ip, port in targets}
while not os.path.exists("/tmp/traffic.stop"):
    for ip, port in targets:
        st = stats[f"{ip}:{port}"]
        try:
            s = socket.create_connection((ip, port), timeout=3)
            s.settimeout(3)
            s.sendall(b"rollout\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    raise OSError("closed without reply")
                buf += chunk
            s.close()
            st["ok"] += 1
            st["last_peer"] = json.loads(buf)["peer"]
        except Exception as exc:
            st["failed"] += 1
            st["errors"].append(f"{time.strftime('%H:%M:%S')} {type(exc).__name__}: {exc}")
    time.sleep(0.05)
print(json.dumps(stats))
"""


def _remote_upstreams(lab, node):
    plan = planner.plan(lab.pillar, node)
    return sorted({(u["ip"], u["component_port"]) for u in plan["upstreams"]
                   if u["node"] != node})


def test_zero_downtime_rollout_by_orchestrate_after_clean(applied):
    """The cluster is as the vendor's setup starts it: components running, no mesh. The
    orchestrate rolls the mesh out under components that keep opening connections: none
    fails, and at the end they all go through the mesh; a plain rerun changes nothing."""
    lab = applied
    clients = {n: _remote_upstreams(lab, n) for n in ("n1", "n5")}
    assert all(clients.values()), clients
    gens = {}
    for node, targets in clients.items():
        lab.run(node, "rm -f /tmp/traffic.stop")
        gens[node] = subprocess.Popen(
            labctl.node_exec_cmd(node, ["python3", "-c", TRAFFIC, json.dumps(targets)]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        orchestrate_rollout()
        time.sleep(3)  # a few rounds after the lockdown
    finally:
        for node in gens:
            lab.run(node, "touch /tmp/traffic.stop", check=False)
    stats = {node: json.loads(g.communicate(timeout=60)[0]) for node, g in gens.items()}
    for node, per_target in stats.items():
        for target, st in per_target.items():
            assert st["failed"] == 0, (node, target, st["errors"][:5])
            assert st["ok"] >= 10, (node, target, st)
            # the last connection went through the mesh: the component saw its sidecar
            # (127.0.0.1, or its own node IP for the ports bound there), not the client
            assert not st["last_peer"].startswith(lab.ip[node] + ":"), (node, target, st)
    lab.wait_mesh_ready()
    rerun = state_summary(lab.apply())
    assert all(not s["changed"] and not s["failed"] for s in rerun.values()), rerun


# What a node must never be left with: a formula unit that failed, or one running without what
# it reads (an agent without its configuration or binary, sidecars without their agent or unit
# file, redirect rules without the egress sidecar they send traffic to).
CONSISTENT = r"""
systemctl list-units --failed --no-legend --plain 'consul*' 'apigee-mtls*' | sed 's/^/failed /'
if systemctl -q is-active consul; then
  for f in /etc/consul.d/consul.json /usr/local/bin/consul /etc/consul.d/tls; do
    [ -e "$f" ] || echo "consul runs without $f"
  done
fi
if systemctl list-units --state=active --no-legend --plain 'apigee-mtls-proxy@*' | grep -q .; then
  systemctl -q is-active consul || echo "sidecars run without consul"
  [ -e /etc/systemd/system/apigee-mtls-proxy@.service ] || echo "sidecars run without their unit"
fi
if iptables -w -t nat -S APIGEE-MTLS-OUT 2>/dev/null | grep -q REDIRECT; then
  systemctl list-units --state=active --no-legend --plain 'apigee-mtls-proxy@egress*' \
    | grep -q . || echo "redirect rules without the egress sidecar"
fi
true
"""

#: each sub-clean alone, on a running node, then what brings the node back: the sub-states,
#: each applied alone in order (after install.clean, the deepest, every one of them; after
#: firewall.clean and mesh.clean, theirs), or the whole formula in one run (after the
#: others: each sub-state alone is already proven by install's restore; CI time)
SUB_CLEANS = (
    ("firewall", ("firewall",)),
    ("mesh", ("mesh", "firewall")),
    ("service", ("",)),
    ("acl", ("",)),
    ("config", ("",)),
    ("tls", ("",)),
    ("install", ("install", "tls", "config", "service", "acl", "mesh", "firewall", "keyring")),
)


def test_each_sub_clean_alone_ends_consistent_and_sub_states_alone_restore_the_node(applied):
    """Issue 13: each `apigee_mtls.<x>.clean` applied alone on a running node first undoes
    what depends on the files it removes (firewall.clean <- mesh.clean <- service.clean <-
    acl, config, tls, install .clean), so the node ends consistent: no failed unit, nothing
    running without what it reads; `install.clean` leaves nothing of the formula. Then the
    sub-states, each applied alone (their includes form no cycle), bring the node back into
    the mesh after install.clean (every sub-state), firewall.clean and mesh.clean; the whole
    formula after the others: `apigee_mtls.verify` passes everywhere."""
    lab = applied
    lab.wait_mesh_ready()
    node = "n5"
    for clean, restore in SUB_CLEANS:
        ret = lab.apply(node, f"apigee_mtls.{clean}.clean")
        summary = state_summary(ret)
        assert not summary[node]["failed"], (clean, summary[node])
        assert summary[node]["changed"], (clean, "changed nothing on a running node")
        problems = lab.run(node, CONSISTENT).stdout.strip()
        assert problems == "", f"after {clean}.clean: {problems}"
        if clean == "install":
            # a stopped, empty slice systemd keeps loaded for a while is bookkeeping
            left = [line for line in lab.run(node, LEFTOVERS).stdout.splitlines()
                    if line.strip() and not re.search(r"\.slice +loaded +inactive +dead", line)]
            assert left == [], f"{node} keeps: {left}"
        for sub in restore:
            back = state_summary(lab.apply(node, "apigee_mtls" + (f".{sub}" if sub else "")))
            assert not back[node]["failed"], (clean, sub, back[node])
        lab.wait_mesh_ready(timeout=180)
        assert lab.run(node, CONSISTENT).stdout.strip() == ""
    # what lives in Consul's data (keyring, intentions, the Connect CA) goes with
    # install.clean: these cleans are documented no-ops, alone too
    for clean in ("keyring", "intentions", "connect_ca"):
        summary = state_summary(lab.apply(node, f"apigee_mtls.{clean}.clean"))
        assert not summary[node]["failed"] and not summary[node]["changed"], (clean, summary)
    # the signer's own sub-states, alone on a converged signer: they change nothing
    signer = lab.model["tls"]["signer"]
    for sub in ("tls.ca", "intentions", "connect_ca", "keyring"):
        ret = lab.apply(signer, f"apigee_mtls.{sub}")
        summary = state_summary(ret).get(signer, {"failed": [], "changed": []})
        assert not summary["failed"] and not summary["changed"], (sub, summary)
    lab.wait_mesh_ready()
