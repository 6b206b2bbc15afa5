"""The mesh, proven on the lab: every allowed flow reaches the right component through mTLS,
nothing crosses the bridge in plaintext, and nothing else gets through."""
import json
import os
import subprocess
import time
import uuid

import pytest

from conftest import (assert_no_loss, bridge_capture, labctl, planner, state_summary,
                      under_traffic)


def _plan(lab, node):
    return planner.plan(lab.pillar, node)


def _stamps(plan):
    """{service: (public listener, {upstream destination: bind port})}, as
    apigee_mtls.sidecar_listeners_managed records them."""
    out = {}
    for svc in plan["services"]:
        side = svc["connect"]["sidecar_service"]
        listener = (side["address"], side["port"], side["proxy"]["local_service_address"],
                    side["proxy"]["local_service_port"])
        ups = {u["destination_name"]: u["local_bind_port"]
               for u in side["proxy"].get("upstreams", [])}
        out[svc["id"]] = (listener, ups)
    return out


def _sidecar_ports(lab):
    ports = set()
    for alloc in lab.model["allocation"].values():
        ports.add(alloc["egress"])
        for block in alloc["ingress"].values():
            ports.update(block.values())
    return ports


def _component_ports(lab):
    return {p for c in lab.model["components"].values() for p in c.get("ports", [])}


def _all_flows(lab, marker=""):
    """{node: ([(ip, component_port, payload, upstream)], [spec])} for every allowed flow:
    the stand-ins' (a line out, their identity back) and, on a lab with real datastores,
    traffic specs for the datastores' client ports (probed in their own protocols:
    ``Lab.flow_targets``)."""
    flows = {}
    for node in lab.nodes:
        echo, probed = lab.flow_targets(_plan(lab, node)["upstreams"])
        flows[node] = ([(u["ip"], u["component_port"], f"{marker}{node}->{u['service']}", u)
                        for u in echo], probed)
    return flows


#: how long the mesh stays idle for the journal check (issue 13: two minutes)
IDLE_SECONDS = float(os.environ.get("LAB_IDLE_SECONDS", "60"))


def test_at_rest_the_agents_and_sidecars_log_no_error_or_warning(mesh):
    """Operators alert on ERROR: a healthy mesh at rest (after the rollout, no change running)
    logs none, nor WARN, from Consul, any sidecar or the firewall unit, over an idle minute
    (the egress sidecar's check used to log "proxy.inbound: failed to dial" every 5 s on every
    node; Consul's anti-entropy sync runs at least once a minute on a 5-node cluster)."""
    lab = mesh
    since = {n: lab.run(n, "date +%s").stdout.strip() for n in lab.nodes}
    time.sleep(IDLE_SECONDS)
    bad = {}
    for node in lab.nodes:
        out = lab.run(node, f"journalctl --since @{since[node]} --no-pager -o cat "
                            "-u consul -u 'apigee-mtls-proxy@*' -u apigee-mtls-firewall",
                      check=False).stdout
        lines = [line for line in out.splitlines() if "[ERROR]" in line or "[WARN]" in line]
        if lines:
            bad[node] = lines[:5]
    assert not bad, bad


def test_readme_consul_cli_commands_work_with_the_node_token(mesh):
    """README "Running consul by hand": the node's own token lists members and services and
    checks an intention; the local agent master token reloads the agent; without a token
    the CLI sees nothing (ACLs deny by default)."""
    lab = mesh
    node, peer = "n2", "n1"
    env = "CONSUL_HTTP_TOKEN_FILE=/etc/consul.d/acl/agent.token"
    zk = f"zk-2181-{lab.ip[node].replace('.', '-')}"
    egress = _plan(lab, peer)["egress"]["identity"]
    members = lab.run(node, ["env", env, "consul", "members"]).stdout
    assert all(n in members for n in lab.nodes), members
    assert zk in lab.run(node, ["env", env, "consul", "catalog", "services"]).stdout
    check = lab.run(node, ["env", env, "consul", "intention", "check", egress, zk], check=False)
    assert check.stdout.strip() == "Allowed", (check.stdout, check.stderr)
    master = "CONSUL_HTTP_TOKEN_FILE=/etc/consul.d/acl/agent-master.token"
    assert lab.run(node, ["env", master, "consul", "reload"]).returncode == 0
    anonymous = lab.run(node, ["consul", "members"], check=False).stdout
    assert not any(n in anonymous for n in lab.nodes), anonymous
    # and the one-line verify view
    code, lines = lab.salt_plain("*", "apigee_mtls.verify", "summary=True")
    assert code == 0 and set(lines) == set(lab.nodes), (code, lines)
    assert all(line.startswith("OK: ") and "upstreams answer" in line
               for line in lines.values()), lines


def test_every_allowed_flow_reaches_the_right_component_through_the_mesh(mesh):
    lab = mesh
    flows = _all_flows(lab)
    total = 0
    for node, (items, probed) in flows.items():
        assert items or probed, f"{node} has no upstreams"
        for spec, res in zip(probed, lab.probe(node, probed)):
            assert res.get("ok"), f"{node} -> {spec['node']} {spec['component']}: {res}"
            total += 1
        replies = lab.requests(node, [(ip, port, payload) for ip, port, payload, _ in items])
        for (ip, port, payload, up), reply in zip(items, replies):
            assert "error" not in reply, f"{node} -> {up['service']} ({ip}:{port}): {reply}"
            assert (reply["component"], reply["node"], reply["port"]) == (
                up["component"], up["node"], port), (node, up, reply)
            assert reply["echo"] == payload
            # it came out of the destination's own sidecar, not from the source node
            peer_ip = reply["peer"].rsplit(":", 1)[0]
            assert peer_ip in ("127.0.0.1", up["ip"]), (node, up, reply)
            assert peer_ip != lab.ip[node]
            total += 1
    assert total >= 50, total
    if lab.components == "real":
        assert any(probed for _, probed in flows.values()), "no real datastore was probed"


def test_capture_shows_only_tls_between_sidecars(mesh):
    """tcpdump on the lab bridge while every flow runs with a unique marker: the marker never
    appears on the wire, and no packet between nodes uses a component port."""
    lab = mesh
    marker = "PLAINTEXT-" + uuid.uuid4().hex
    flows = _all_flows(lab, marker)
    answered = probed_ok = 0
    with bridge_capture("mesh-capture") as capture:
        for node, (items, probed) in flows.items():
            replies = lab.requests(node, [(ip, port, payload) for ip, port, payload, _ in items])
            answered += sum(1 for r in replies if r.get("echo", "").startswith(marker))
            probed_ok += sum(1 for r in lab.probe(node, probed) if r.get("ok"))
    assert answered == sum(len(items) for items, _ in flows.values())
    assert probed_ok == sum(len(probed) for _, probed in flows.values())
    raw = capture["raw"]
    assert len(raw) > 10000, "capture is empty: the test would prove nothing"
    assert marker.encode() not in raw, "plaintext payload seen on the lab bridge"
    node_ips = set(lab.ip.values())
    sidecars = _sidecar_ports(lab)
    consul = {8300, 8301, 8302, 8501}
    components = _component_ports(lab)
    seen_sidecar = 0
    for line in capture["text"].splitlines():
        parts = line.split()
        if len(parts) < 5 or parts[1] != "IP":
            continue
        src, dst = parts[2], parts[4].rstrip(":")
        sip, sport = src.rsplit(".", 1)
        dip, dport = dst.rsplit(".", 1)
        if sip in node_ips and dip in node_ips:
            ports = {int(sport), int(dport)}
            assert not ports & components, f"component port on the wire: {line}"
            assert ports & (sidecars | consul), f"unexpected node-to-node traffic: {line}"
            seen_sidecar += bool(ports & sidecars)
    assert seen_sidecar > 0


def test_direct_plaintext_to_a_component_port_is_refused(mesh):
    """Plaintext straight to a component port from another host is refused by the node's
    INPUT chain: from a node with no flow to it (no redirect), and from the host."""
    lab = mesh
    # n4 (postgres, qpid) has no flow to the router: its traffic is not redirected
    src = "n4"
    assert not [u for u in _plan(lab, src)["upstreams"] if u["component"] == "router"]
    replies = lab.requests(src, [(lab.ip["n2"], 8081, "direct"), (lab.ip["n2"], 4527, "direct")])
    for r in replies:
        assert "error" in r and "ConnectionRefused" in r["error"], r
    # as the consul user the redirect is bypassed too: still refused (no plaintext accepted)
    proc = lab.run(src, ["setpriv", "--reuid=consul", "--regid=consul", "--clear-groups",
                         "python3", "-c", "import socket; socket.create_connection(('%s', 2181), timeout=3)" % lab.ip["n2"]],
                   check=False)
    assert proc.returncode != 0 and "ConnectionRefusedError" in proc.stderr, proc.stderr


def test_client_without_mesh_certificate_is_rejected_by_a_sidecar(mesh):
    lab = mesh
    target = next(s for s in _plan(lab, "n2")["services"] if s["id"].startswith("rt-8081"))
    port = target["connect"]["sidecar_service"]["port"]
    code = f"""
import json, socket, ssl
res = {{}}
# plaintext to the sidecar's public port
s = socket.create_connection(({lab.ip['n2']!r}, {port}), timeout=4)
s.settimeout(4)
s.sendall(b"hello\\n")
try:
    data = s.recv(4096)
    res["plain"] = "reply" if b"component" in data else "no-reply"
except Exception as exc:
    res["plain"] = "no-reply:" + type(exc).__name__
# TLS with the agent certificate (cluster CA, not the Connect CA)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.load_cert_chain("/etc/consul.d/tls/agent.pem", "/etc/consul.d/tls/agent-key.pem")
try:
    t = ctx.wrap_socket(socket.create_connection(({lab.ip['n2']!r}, {port}), timeout=4))
    t.settimeout(4)
    t.sendall(b"hello\\n")
    data = t.recv(4096)
    res["agent_cert"] = "reply" if b"component" in data else "no-reply"
except Exception as exc:
    res["agent_cert"] = "no-reply:" + type(exc).__name__
print(json.dumps(res))
"""
    res = lab.py("n4", code)
    assert res["plain"].startswith("no-reply"), res
    assert res["agent_cert"].startswith("no-reply"), res


def _leaf_request(lab, node, identity, ip, port):
    """From `node`, get a Connect leaf certificate for `identity` from the local agent and
    send one request to a sidecar with it. Returns 'reply' or 'no-reply:...'."""
    code = f"""
import json, socket, ssl, tempfile, urllib.request
leaf = json.load(urllib.request.urlopen("http://127.0.0.1:8500/v1/agent/connect/ca/leaf/{identity}"))
roots = json.load(urllib.request.urlopen("http://127.0.0.1:8500/v1/agent/connect/ca/roots"))
d = tempfile.mkdtemp()
open(d + "/c.pem", "w").write(leaf["CertPEM"]); open(d + "/k.pem", "w").write(leaf["PrivateKeyPEM"])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.load_verify_locations(cadata="".join(r["RootCert"] for r in roots["Roots"]))
ctx.load_cert_chain(d + "/c.pem", d + "/k.pem")
try:
    t = ctx.wrap_socket(socket.create_connection(({ip!r}, {port}), timeout=4))
    t.settimeout(4)
    t.sendall(b"hello\\n")
    data = t.recv(4096)
    print(json.dumps("reply" if b"component" in data else "no-reply:closed"))
except Exception as exc:
    print(json.dumps("no-reply:" + type(exc).__name__))
"""
    return lab.py(node, code)


def test_intentions_deny_a_pair_the_flow_table_does_not_allow(mesh):
    """A valid mesh certificate is not enough: n4's egress identity (postgres/qpid node) may not
    reach the router on n2; n1's (management server) may. Request/response, not connect."""
    lab = mesh
    rt = next(s for s in _plan(lab, "n2")["services"] if s["id"].startswith("rt-8081"))
    port = rt["connect"]["sidecar_service"]["port"]
    allowed = _leaf_request(lab, "n1", _plan(lab, "n1")["egress"]["identity"], lab.ip["n2"],
                            port)
    denied = _leaf_request(lab, "n4", _plan(lab, "n4")["egress"]["identity"], lab.ip["n2"],
                           port)
    assert allowed == "reply", allowed
    assert denied.startswith("no-reply"), denied


def test_same_node_traffic_keeps_working(mesh):
    lab = mesh
    replies = lab.requests("n2", [(lab.ip["n2"], 2181, "self"), ("127.0.0.1", 8081, "self"),
                                  (lab.ip["n2"], 2888, "self")])
    for r in replies:
        assert r.get("node") == "n2", r
        assert r["peer"].rsplit(":", 1)[0] in (lab.ip["n2"], "127.0.0.1")


def test_firewall_lives_in_its_own_chains(mesh):
    lab = mesh
    for node in lab.nodes:
        nat_out = lab.run(node, "iptables -w -t nat -S OUTPUT").stdout.splitlines()
        assert [l for l in nat_out if l.startswith("-A")] == ["-A OUTPUT -j APIGEE-MTLS-OUT"]
        inp = lab.run(node, "iptables -w -S INPUT").stdout.splitlines()
        assert [l for l in inp if l.startswith("-A")][0] == "-A INPUT -j APIGEE-MTLS-IN"
        live = lab.run(node, "iptables -w -t nat -S APIGEE-MTLS-OUT").stdout
        # the proxies' own traffic is exempt (else their upstream dials would loop)
        assert "--uid-owner" in live and "-j RETURN" in live
        # SSH and the Salt ports are let through before anything is rejected
        rules = lab.run(node, "iptables -w -S APIGEE-MTLS-IN").stdout.splitlines()
        protected = next(i for i, l in enumerate(rules) if "22,4505,4506" in l)
        first_reject = next(i for i, l in enumerate(rules) if "REJECT" in l or "DROP" in l)
        assert protected < first_reject


def _restarted(lab, ret):
    """{node: [sidecar services apigee_mtls.sidecar_listeners_managed stopped for a move]}."""
    out = {}
    for node in lab.nodes:
        for sid, state in ret[node].items():
            if "-listener-managed_|-" in sid and state["changes"].get("restart"):
                svc = sid.split("apigee-mtls-mesh-proxy-", 1)[1].split("-listener-managed", 1)[0]
                out.setdefault(node, []).append(svc)
    return out


def _only_moved_flows_failed(lab, ret, tot):
    """Under traffic, a pillar change loses only what its own moves must: the flows out of a
    node whose egress sidecar restarted and the flows into a component whose ingress sidecar
    restarted, and only those the harness saw fail. Returns the restarted sidecars."""
    allowed = set()
    components = {s["id"]: s["meta"].get("component")
                  for n in lab.nodes for s in _plan(lab, n)["services"]}
    restarted = _restarted(lab, ret)
    for node, services in restarted.items():
        for svc in services:
            if svc.startswith("egress-"):
                allowed |= {f for f in _flow_names(lab) if f.startswith(node + " -> ")}
            else:
                allowed |= {f for f in _flow_names(lab)
                            if f.endswith(f" -> {node} {components.get(svc)}")}
    print("sidecars restarted for the move:", restarted)
    print("flows allowed to fail (their sidecar restarted):", sorted(allowed))
    assert set(tot["failed_flows"]) <= allowed, (tot["failed_flows"], sorted(allowed))
    assert not tot["missing_reports"], tot
    return restarted


def _targets(pillar, node):
    from traffic import targets_for  # pylint: disable=import-outside-toplevel

    return targets_for(pillar, node)


def _flow_names(lab):
    return {f"{n} -> {t['node']} {t['component']}"
            for n in lab.nodes for t in _targets(lab.pillar, n)}


def test_pillar_change_previews_exactly_what_would_change(mesh):
    """Turning Cassandra inter-node meshing off: test=True lists the services file, the
    cassandra 7000 sidecars, the firewall and the intentions, nothing else; the real run,
    under traffic, restarts no sidecar and loses no connection (no other port moves), and
    the rerun is clean; turning it back on converges the same way."""
    lab = mesh
    pillar = json.loads(json.dumps(lab.pillar))
    pillar["cassandra_internode"] = False
    cass_nodes = {n["id"] for n in lab.model["nodes"] if "cassandra" in n["components"]}
    signer = lab.model["tls"]["signer"]
    try:
        lab.set_pillar(pillar)
        preview = lab.apply("*", "apigee_mtls", "test=True")
        for node in lab.nodes:
            changed = set(state_summary(preview)[node]["changed"])
            old_plan, new_plan = _plan(lab, node), planner.plan(pillar, node)
            # 7000 leaves the cluster's meshed ports: every node's IPv6 refusals change
            expected = {"apigee-mtls-firewall-rules6-managed",
                        "apigee-mtls-firewall-chains-managed"}
            if old_plan["services"] != new_plan["services"]:
                expected |= {"apigee-mtls-mesh-services-file-managed",
                             "apigee-mtls-service-reloaded"}  # would reload the agent
            if (old_plan["firewall"]["nat"], old_plan["firewall"]["filter"]) != (
                    new_plan["firewall"]["nat"], new_plan["firewall"]["filter"]):
                expected.add("apigee-mtls-firewall-rules-managed")
            if node in cass_nodes:
                svc = f"cass-7000-{lab.ip[node].replace('.', '-')}"
                expected |= {f"apigee-mtls-mesh-proxy-{svc}-dead",
                             f"apigee-mtls-mesh-proxy-{svc}-listener-absent",
                             # its ACL policy loses the service: the signer relinks its token
                             "apigee-mtls-acl-agent-token-managed"}
            # sidecars whose listeners change (apigee_mtls.sidecar_listeners_managed says
            # whether each would restart or follow live)
            before = _stamps(_plan(lab, node))
            for svc, (listener, ups) in _stamps(planner.plan(pillar, node)).items():
                if svc in before and (listener, ups) != before[svc]:
                    expected.add(f"apigee-mtls-mesh-proxy-{svc}-listener-managed")
            if node == signer:
                expected.add("apigee-mtls-intentions-managed")
            assert changed == expected, (node, sorted(changed ^ expected))
        real, tot = under_traffic(lab, "cassandra_internode off", lab.apply)
        assert all(not s["failed"] for s in state_summary(real).values()), state_summary(real)
        # no port moves (7000 keeps its slot): no sidecar restarts, nothing fails
        assert _only_moved_flows_failed(lab, real, tot) == {}
        assert_no_loss(tot)
        rerun = state_summary(lab.apply())
        assert all(not s["changed"] for s in rerun.values()), rerun
        # 7000 is now direct again between cassandra nodes... and still answered
        lab.wait_mesh_ready()
        r = lab.requests("n1", [(lab.ip["n2"], 7000, "direct-7000")])[0]
        assert r.get("peer", "").startswith(lab.ip["n1"]), r  # straight from n1, not a sidecar
    finally:
        lab.set_pillar(lab.pillar)
        back, tot = under_traffic(lab, "cassandra_internode on", lab.apply)
    assert all(not s["failed"] for s in state_summary(back).values())
    assert _only_moved_flows_failed(lab, back, tot) == {}
    assert_no_loss(tot)
    lab.wait_mesh_ready()
    r = lab.requests("n1", [(lab.ip["n2"], 7000, "mesh-7000")])[0]
    assert r.get("peer", "").rsplit(":", 1)[0] == lab.ip["n2"], r  # via n2's sidecar again


def test_port_range_move_under_traffic_fails_only_flows_of_restarted_sidecars(mesh):
    """Moving one component's proxy port range (qpid to 11400-11499), the README's "change
    config" procedure, under traffic: the run converges and the rerun is clean; only flows
    through sidecars that were restarted for the move fail (each listed); moving it back
    converges the same way."""
    lab = mesh
    pillar = json.loads(json.dumps(lab.pillar))
    pillar.setdefault("port_ranges", {})["qpid"] = [11400, 11499]
    try:
        lab.set_pillar(pillar)
        real, tot = under_traffic(lab, "qpid port range moved", lab.apply)
        assert all(not s["failed"] for s in state_summary(real).values()), state_summary(real)
        restarted = _only_moved_flows_failed(lab, real, tot)
        # qpid's own sidecars move their public listeners; its clients' egress sidecars
        # open the new ports live and keep running (with every connection through them)
        qpid = {n["id"] for n in lab.model["nodes"] if "qpid" in n["components"]}
        assert set(restarted) == qpid, restarted
        assert not any(s.startswith("egress-") for v in restarted.values() for s in v)
        assert set(tot["failed_flows"]) <= {f for f in _flow_names(lab) if f.endswith(" qpid")}
        rerun = state_summary(lab.apply())
        assert all(not s["changed"] for s in rerun.values()), rerun
        lab.wait_mesh_ready()
    finally:
        lab.set_pillar(lab.pillar)
        back, tot = under_traffic(lab, "qpid port range moved back", lab.apply)
    assert all(not s["failed"] for s in state_summary(back).values())
    restarted = _only_moved_flows_failed(lab, back, tot)
    assert not any(s.startswith("egress-") for v in restarted.values() for s in v), restarted
    lab.wait_mesh_ready()


def test_node_reboot_brings_everything_back_by_itself(mesh):
    """Machine restart with its disk kept: agent, sidecars and the firewall chains (IPv4 and
    IPv6) come back without Salt, flows through the node work, and a state rerun reports 0 changes."""
    lab = mesh
    node = "n2"
    subprocess.run([labctl.sys.executable, os.path.join(labctl.REPO, "lab", "labctl.py"),
                    "reboot", node], check=True, capture_output=True)
    plan = _plan(lab, node)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        nat = lab.run(node, "iptables -w -t nat -S APIGEE-MTLS-OUT", check=False).stdout
        active = lab.run(node, "systemctl is-active consul 'apigee-mtls-proxy@*'",
                         check=False).stdout.split()
        if "-A APIGEE-MTLS-OUT" in nat and active and set(active) == {"active"}:
            break
        time.sleep(1)
    assert len([l for l in nat.splitlines() if l.startswith("-A")]) == len(plan["firewall"]["nat"])
    # the IPv6 chains are back too, exactly as planned, jumped first
    for chain, parent, part in (("APIGEE-MTLS-IN", "INPUT", "input"),
                                ("APIGEE-MTLS-OUT", "OUTPUT", "output")):
        rules = lab.run(node, f"ip6tables -w -S {chain}").stdout.splitlines()
        assert [l for l in rules if l.startswith("-A")] == plan["firewall"]["ip6"][part]
        jumps = lab.run(node, f"ip6tables -w -S {parent}").stdout.splitlines()
        assert [l for l in jumps if l.startswith("-A")][0] == f"-A {parent} -j {chain}"
    units = lab.run(node, "systemctl list-units --plain --no-legend 'apigee-mtls-proxy@*'").stdout
    assert len(units.strip().splitlines()) == len(plan["proxies"])
    lab.wait_mesh_ready()
    # flows out of and into the rebooted node
    out = lab.requests(node, [(u["ip"], u["component_port"], "after-reboot")
                              for u in plan["upstreams"]])
    assert all("error" not in r for r in out), out
    into = lab.requests("n1", [(lab.ip[node], 8081, "into-rebooted"), (lab.ip[node], 2181, "zk")])
    assert [r.get("node") for r in into] == [node, node], into
    rerun = state_summary(lab.apply())
    assert all(not s["changed"] and not s["failed"] for s in rerun.values()), rerun


def test_port_report_from_a_minion(mesh):
    """`salt <node> apigee_mtls.ports` reports, per host, services, ports and upstreams; it
    matches what the sidecars really listen on."""
    lab = mesh
    report = lab.salt("n1", "apigee_mtls.ports")["n1"]
    assert set(report) == set(lab.nodes)
    for node in ("n1", "n4"):
        listening = lab.run(node, "ss -Hltn").stdout
        for entry in report[node]["ingress"]:
            assert f"{lab.ip[node]}:{entry['proxy_port']} " in listening, (node, entry)
        assert f"{lab.ip[node]}:{report[node]['egress']} " in listening
    ports = [e["proxy_port"] for n in report.values() for e in n["ingress"]]
    ports += [n["egress"] for n in report.values()]
    assert len(ports) == len(set(ports)), "a proxy port is used twice in the cluster"


def test_non_members_cannot_reach_consul_or_sidecar_ports(mesh):
    """The host (10.77.0.1, on the lab bridge but not a cluster member) is refused on Consul's
    ports and on the sidecars' ports, while cluster members get through."""
    import socket

    lab = mesh
    target = lab.ip["n2"]
    sidecar = next(s for s in _plan(lab, "n2")["services"]
                   if s["id"].startswith("zk-2181"))["connect"]["sidecar_service"]["port"]
    for port in (8300, 8301, 8501, sidecar):
        with pytest.raises(OSError):
            socket.create_connection((target, port), timeout=3).close()
    code = ("import socket, json; r = {}\n"
            f"for p in (8300, 8301, 8501, {sidecar}):\n"
            f"    socket.create_connection(({target!r}, p), timeout=3).close(); r[p] = 'ok'\n"
            "print(json.dumps(r))")
    assert len(lab.py("n4", code)) == 4
