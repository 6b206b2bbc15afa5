"""Issue 11, proven on the lab: on a dual-stack network (each node fd77::<octet>/64 on the
bridge, the host fd77::1, stand-ins listening on [::] like PostgreSQL or a JVM) no meshed
component port is reachable over IPv6: refused by the sender's OUTPUT chain and by the
receiver's INPUT chain, nothing plaintext crosses the bridge over IPv6, IPv4 flows keep going
through the mesh, drift in the IPv6 chains is reported and repaired, and a node with IPv6
disabled is skipped, not failed."""
import json
import socket
import time

import pytest

from conftest import bridge_capture, labctl, planner, state_summary

CHAINS = "apigee-mtls-firewall-chains-managed"

# Python for a node: connect to each (address, port) over IPv6, send a line, and say what
# happened: "refused", "reply:<component>", or the error.
ATTEMPTS = r"""
import json, socket, sys
out = []
for addr, port in json.loads(sys.argv[1]):
    try:
        s = socket.create_connection((addr, port), timeout=3)
        s.settimeout(3)
        s.sendall(b"over-ipv6\n")
        data = s.recv(4096)
        s.close()
        out.append("reply:" + json.loads(data)["component"] if data else "closed")
    except ConnectionRefusedError:
        out.append("refused")
    except Exception as exc:
        out.append(type(exc).__name__ + ": " + str(exc))
print(json.dumps(out))
"""


def v6(lab, node):
    return labctl.ipv6_of(lab.ip[node])


def attempts(lab, node, targets):
    proc = lab.run(node, ["python3", "-c", ATTEMPTS, json.dumps(targets)],
                   timeout=5 * len(targets) + 30)
    return json.loads(proc.stdout)


def from_host(targets):
    """The same from the test process, bound to the host's bridge address (no namespace)."""
    out = []
    for addr, port in targets:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.settimeout(3)
        try:
            s.bind((labctl.HOST_IP6, 0))
            s.connect((addr, port))
            s.sendall(b"from-host\n")
            data = s.recv(4096)
            out.append("reply" if b"component" in data else "closed")
        except ConnectionRefusedError:
            out.append("refused")
        except OSError as exc:
            out.append(type(exc).__name__ + ": " + str(exc))
        finally:
            s.close()
    return out


def node_component_ports(lab, node):
    """{port: target} of the meshed component ports a node hosts."""
    ingress = lab.model["allocation"][node]["ingress"]
    comps = lab.model["components"]
    return {p: comps[c]["targets"].get(p, "loopback") for c, block in ingress.items()
            for p in block}


def cluster_component_ports(lab):
    return {p for n in lab.nodes for p in node_component_ports(lab, n)}


def component_rules(lab, node, part):
    """The plan's IPv6 rules that refuse component ports (the ones lockdown adds)."""
    full = planner.plan(lab.pillar, node)["firewall"]["ip6"][part]
    staged = planner.plan(lab.pillar, node, lockdown=False)["firewall"]["ip6"][part]
    return [i for i, r in enumerate(full) if r not in staged]


def refused_packets(lab, node, chain, part):
    """Packets counted so far by the component-port REJECT rules of an IPv6 chain."""
    rows = lab.run(node, f"ip6tables -w -L {chain} -n -v -x --line-numbers").stdout.splitlines()
    counts = {int(r.split()[0]): int(r.split()[1]) for r in rows if r[:1].isdigit()}
    return sum(counts[i + 1] for i in component_rules(lab, node, part))


def live(lab, node, chain):
    out = lab.run(node, f"ip6tables -w -S {chain}").stdout.splitlines()
    return [l for l in out if l.startswith("-A ")]


def wait_ipv6(lab, nodes, timeout=60):
    def ready(node):
        out = lab.run(node, "ip -6 -o addr show dev host0", check=False).stdout
        return f"{v6(lab, node)}/64" in out and "tentative" not in out

    deadline = time.monotonic() + timeout
    pending = list(nodes)
    while pending and time.monotonic() < deadline:
        pending = [n for n in pending if not ready(n)]
        time.sleep(1)
    assert not pending, f"no IPv6 address on {pending}"


def chains_state(ret, node):
    return next(s for s in ret[node].values() if s.get("__id__") == CHAINS)


@pytest.fixture(scope="module")
def dual(applied):
    applied.wait_mesh_ready()
    wait_ipv6(applied, applied.nodes)
    return applied


def test_ipv6_chains_match_the_plan_and_are_jumped_first(dual):
    lab = dual
    for node in lab.nodes:
        ip6 = planner.plan(lab.pillar, node)["firewall"]["ip6"]
        assert live(lab, node, "APIGEE-MTLS-IN") == ip6["input"], node
        assert live(lab, node, "APIGEE-MTLS-OUT") == ip6["output"], node
        inp = lab.run(node, "ip6tables -w -S INPUT").stdout.splitlines()
        out = lab.run(node, "ip6tables -w -S OUTPUT").stdout.splitlines()
        assert [l for l in inp if l.startswith("-A")][0] == "-A INPUT -j APIGEE-MTLS-IN"
        assert [l for l in out if l.startswith("-A")][0] == "-A OUTPUT -j APIGEE-MTLS-OUT"
        assert "icmp" not in lab.run(node, "ip6tables-save").stdout.lower()


def test_component_listeners_are_dual_stack(dual):
    """Control for the refusals below: every loopback-targeted component port answers over
    IPv6 on its own node ([::1], loopback is never refused), so a refusal from elsewhere is
    the firewall's, not a missing listener."""
    lab = dual
    for node in lab.nodes:
        ports = [p for p, t in node_component_ports(lab, node).items() if t == "loopback"]
        res = attempts(lab, node, [["::1", p] for p in ports])
        assert all(r.startswith("reply:") for r in res), (node, dict(zip(ports, res)))


def test_every_component_port_is_refused_over_ipv6_from_every_node(dual):
    """Outbound: each node's APIGEE-MTLS-OUT answers with a TCP reset (counted by its
    component REJECT rules) for every meshed component port of every other node; a
    non-meshed port over IPv6 still answers (the IPv6 path itself works)."""
    lab = dual
    for src in lab.nodes:
        targets = [[v6(lab, dst), p] for dst in lab.nodes if dst != src
                   for p in sorted(node_component_ports(lab, dst))]
        before = refused_packets(lab, src, "APIGEE-MTLS-OUT", "output")
        res = attempts(lab, src, targets)
        bad = [(t, r) for t, r in zip(targets, res) if r != "refused"]
        assert not bad, (src, bad)
        assert refused_packets(lab, src, "APIGEE-MTLS-OUT", "output") - before >= len(targets)
    control = attempts(lab, "n2", [[v6(lab, "n1"), 8080]])
    assert control == ["reply:management-server"], control


def test_every_component_port_is_refused_over_ipv6_from_the_host(dual):
    """Inbound, independent of any sender's OUTPUT chain: from the host's fd77::1 every meshed
    component port of every node is refused, by that node's APIGEE-MTLS-IN (its counters
    grow); the host reaches a non-meshed port over IPv6."""
    lab = dual
    for node in lab.nodes:
        ports = sorted(node_component_ports(lab, node))
        before = refused_packets(lab, node, "APIGEE-MTLS-IN", "input")
        res = from_host([(v6(lab, node), p) for p in ports])
        assert res == ["refused"] * len(ports), (node, dict(zip(ports, res)))
        assert refused_packets(lab, node, "APIGEE-MTLS-IN", "input") - before >= len(ports)
    assert from_host([(v6(lab, "n1"), 8080)]) == ["reply"]


def test_ipv4_mesh_flows_still_work(dual):
    lab = dual
    r = lab.requests("n1", [(lab.ip["n2"], 8081, "v4-through-mesh")])[0]
    assert (r.get("component"), r.get("node"), r.get("echo")) == (
        "router", "n2", "v4-through-mesh"), r
    assert r["peer"].rsplit(":", 1)[0] in ("127.0.0.1", lab.ip["n2"]), r  # n2's sidecar


def test_capture_shows_no_ipv6_packet_to_a_component_port(dual):
    """tcpdump on the bridge while every node tries every other node's component ports over
    IPv6 and the IPv4 mesh flows run: no IPv6 packet to a component port; the capture does
    see IPv6 (a control connection to a non-meshed port)."""
    lab = dual
    with bridge_capture("ipv6-capture", "ip6 or tcp", ["ip6"]) as capture:
        for src in lab.nodes:
            targets = [[v6(lab, dst), p] for dst in lab.nodes if dst != src
                       for p in sorted(node_component_ports(lab, dst))]
            assert set(attempts(lab, src, targets)) == {"refused"}, src
            ups = planner.plan(lab.pillar, src)["upstreams"]
            replies = lab.requests(src, [(u["ip"], u["component_port"], "cap") for u in ups])
            assert all("error" not in r for r in replies), (src, replies)
        assert attempts(lab, "n2", [[v6(lab, "n1"), 8080]]) == ["reply:management-server"]
    components = cluster_component_ports(lab)
    control = 0
    for line in capture["text"].splitlines():
        parts = line.split()
        if len(parts) < 5 or parts[1] != "IP6" or "." not in parts[4]:
            continue  # ICMPv6 (neighbour discovery) has no ports
        dst = parts[4].rstrip(":")
        port = int(dst.rsplit(".", 1)[1])
        assert port not in components, f"IPv6 packet to a component port: {line}"
        control += dst == f"{v6(lab, 'n1')}.8080"
    assert control > 0, "the capture saw no IPv6 traffic: it would prove nothing"


def test_ipv6_drift_is_reported_and_repaired(dual):
    lab = dual
    node = "n3"
    ip6 = planner.plan(lab.pillar, node)["firewall"]["ip6"]
    index = component_rules(lab, node, "input")[0]
    lab.run(node, f"ip6tables -w -D APIGEE-MTLS-IN {index + 1}")
    try:
        assert live(lab, node, "APIGEE-MTLS-IN") == ip6["input"][:index] + ip6["input"][index + 1:]
        # the deleted rule is what refused: the host now gets plaintext from the router
        assert from_host([(v6(lab, node), 8081)]) == ["reply"]
        verdict = lab.salt(node, "apigee_mtls.verify")[node]
        assert verdict["ok"] is False, verdict
        fw = verdict["checks"]["firewall"]
        assert fw["ok"] is False and fw["drifted"] == ["ip6:APIGEE-MTLS-IN"], fw
        assert fw["ipv6"] == "checked"
    finally:
        ret = lab.apply(node)
    state = chains_state(ret, node)
    assert state["result"] is True, state
    assert state["changes"] == {"ip6:APIGEE-MTLS-IN": {"added": [ip6["input"][index]],
                                                       "removed": []}}, state
    assert live(lab, node, "APIGEE-MTLS-IN") == ip6["input"]
    assert from_host([(v6(lab, node), 8081)]) == ["refused"]
    rerun = state_summary(lab.apply(node))[node]
    assert rerun["changed"] == [] and not rerun["failed"], rerun
    assert lab.salt(node, "apigee_mtls.verify")[node]["ok"] is True


def _set_ipv6(lab, node, on):
    lab.run(node, f"echo {0 if on else 1} > /proc/sys/net/ipv6/conf/all/disable_ipv6")
    if on:
        lab.run(node, "echo 0 > /proc/sys/net/ipv6/conf/default/disable_ipv6; "
                      "networkctl reconfigure host0 || systemctl restart systemd-networkd")


def test_a_node_with_ipv6_disabled_converges_and_says_ipv6_was_skipped(dual):
    lab = dual
    node = "n5"
    _set_ipv6(lab, node, False)
    try:
        assert lab.run(node, "cat /proc/sys/net/ipv6/conf/all/disable_ipv6").stdout.strip() == "1"
        ret = lab.apply(node)
        summary = state_summary(ret)[node]
        assert not summary["failed"], summary
        state = chains_state(ret, node)
        assert state["result"] is True and state["changes"] == {}, state
        assert "IPv6 firewall skipped: IPv6 disabled" in state["comment"], state
        fw = lab.salt(node, "apigee_mtls.verify")[node]["checks"]["firewall"]
        assert fw["ok"] is True and fw["ipv6"] == "skipped: IPv6 disabled", fw
        # the boot path too: the script skips IPv6 and succeeds
        proc = lab.run(node, "/usr/local/sbin/apigee-mtls-firewall apply")
        assert "IPv6 skipped" in proc.stderr
    finally:
        _set_ipv6(lab, node, True)
    wait_ipv6(lab, [node])
    ret = lab.apply(node)
    assert not state_summary(ret)[node]["failed"]
    assert "skipped" not in chains_state(ret, node)["comment"]
    fw = lab.salt(node, "apigee_mtls.verify")[node]["checks"]["firewall"]
    assert fw["ok"] is True and fw["ipv6"] == "checked", fw
    assert from_host([(v6(lab, node), 5432)]) == ["refused"]
