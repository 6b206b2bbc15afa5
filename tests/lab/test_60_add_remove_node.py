"""Day-2: add a node (pillar edit + targeted highstate on it + the one-liner for the peers) and
remove it again (clean on it, pillar edit, the one-liner). No already-allocated port moves."""
import copy

import pytest

from conftest import (AGENT_TOKEN, MGMT_TOKEN, applied_ok, assert_no_loss, planner, state_summary,
                      under_traffic)

NEW = {"id": "n6", "ip": "10.77.0.16", "components": ["message-processor", "router"]}


def _proxy_pids(lab, node):
    out = lab.run(node, "systemctl show -p Id,MainPID 'apigee-mtls-proxy@*'").stdout
    return out


@pytest.fixture(scope="module")
def grown(applied, tmp_path_factory):
    lab = applied
    lab.wait_mesh_ready()
    pillar = copy.deepcopy(lab.pillar)
    pillar["nodes"].append(dict(NEW))
    before_report = lab.salt("n1", "apigee_mtls.ports")["n1"]
    before_pids = _proxy_pids(lab, "n2")
    lab.boot_node(NEW, pillar, tmp_path_factory.mktemp("topo"))
    lab.set_pillar(pillar)
    lab.nodes.append(NEW["id"])
    yield lab, pillar, before_report, before_pids
    lab.nodes.remove(NEW["id"])


def test_add_node_targeted_highstate_then_peers_converge(grown):
    lab, pillar, before_report, before_pids = grown
    # 1. the new node: a targeted highstate (syncs the custom modules by itself)
    applied_ok(lab.salt(NEW["id"], "state.highstate", "-t", "600", timeout=700))
    # 2. the peers (and the intentions): the one-liner, under traffic between the old nodes
    old_nodes = [n for n in lab.nodes if n != NEW["id"]]
    ret, tot = under_traffic(lab, "adding a node", lab.apply, nodes=old_nodes,
                             pillar=lab.pillar)
    applied_ok(ret)
    assert_no_loss(tot)
    lab.wait_mesh_ready()
    # no already-allocated port moved, and the peers' sidecars were not even restarted
    after_report = lab.salt("n1", "apigee_mtls.ports")["n1"]
    for node, entry in before_report.items():
        assert after_report[node]["egress"] == entry["egress"]
        assert after_report[node]["ingress"] == entry["ingress"], node
    assert _proxy_pids(lab, "n2") == before_pids
    # flows out of the new node (router/MP -> zookeeper, cassandra, qpid) and into it (MS)
    ups = planner.plan(pillar, NEW["id"])["upstreams"]
    assert ups
    replies = lab.requests(NEW["id"], [(u["ip"], u["component_port"], "from-n6") for u in ups])
    for up, r in zip(ups, replies):
        assert r.get("node") == up["node"] and r.get("component") == up["component"], (up, r)
    into = lab.requests("n1", [(NEW["ip"], 8081, "ms->n6"), (NEW["ip"], 8082, "ms->n6")])
    assert [r.get("node") for r in into] == [NEW["id"]] * 2, into
    assert all(r["peer"].startswith("127.0.0.1:") for r in into), into
    # converged: 0 changes anywhere
    rerun = state_summary(lab.apply())
    assert all(not s["changed"] for s in rerun.values()), rerun


def test_remove_node_peers_lose_its_upstreams_rules_and_intentions(grown):
    lab, pillar, _, _ = grown
    # its ACL token, to check that the signer revokes it (clean removes the file)
    token = lab.run(NEW["id"], f"cat {AGENT_TOKEN}").stdout.strip()
    assert len(token) == 36
    applied_ok(lab.apply(NEW["id"], "apigee_mtls.clean"))
    lab.set_pillar(lab.pillar)  # the pillar without n6
    ret, tot = under_traffic(lab, "removing a node", lab.apply,
                             nodes=[n for n in lab.nodes if n != NEW["id"]], pillar=lab.pillar)
    summary = applied_ok(ret)
    assert_no_loss(tot)
    assert summary[NEW["id"]]["changed"] == []  # no longer a member: nothing to do there
    dashed = NEW["ip"].replace(".", "-")
    for node in [n for n in lab.nodes if n != NEW["id"]]:
        nat = lab.run(node, "iptables -w -t nat -S APIGEE-MTLS-OUT").stdout
        assert NEW["ip"] not in nat, node
        services = lab.run(node, "cat /etc/consul.d/apigee-mtls-services.json").stdout
        assert dashed not in services, node
    signer = lab.model["tls"]["signer"]
    intentions = lab.py(signer, "import json, urllib.request; print(json.dumps(urllib.request."
                                "urlopen('http://127.0.0.1:8500/v1/connect/intentions').read()"
                                ".decode()))", token=MGMT_TOKEN)
    assert "egress-" in intentions  # the management token reads them all
    assert dashed not in intentions
    # the removed node's token no longer works anywhere (a decommissioned host keeps nothing)
    probe = ("import json, urllib.error, urllib.request\n"
             "req = urllib.request.Request('http://127.0.0.1:8500/v1/acl/token/self')\n"
             f"req.add_header('X-Consul-Token', {token!r})\n"
             "try:\n    print(json.dumps(urllib.request.urlopen(req).status))\n"
             "except urllib.error.HTTPError as exc:\n    print(json.dumps(exc.code))\n")
    assert lab.py(signer, probe, token=None) == 403
    rerun = state_summary(lab.apply())
    assert all(not s["changed"] for s in rerun.values()), rerun
    # decommission the machine: later `salt '*'` runs do not wait for a minion that is gone
    lab.decommission(NEW["id"])
