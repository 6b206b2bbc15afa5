"""Topology-generic checks, for whatever $TOPOLOGY the session booted (make test runs them on
the 5-node lab, then on the 12-node two-data-center one): LAN membership per data center,
WAN federation of the servers, one leader per data center, and the cross-DC flows (Cassandra
and Postgres replication, ZooKeeper, ...) answering through the mesh.

Runs before test_20's node reboot: a server restarted without leaving may stay "leaving"
(status 2) in its peers' WAN pool although it serves (hashicorp/consul#6882, seen in the lab),
and these checks want every member alive."""
import json

import pytest

from conftest import planner


@pytest.fixture(scope="module")
def mesh(applied):
    applied.wait_mesh_ready(timeout=300)
    return applied


def _by_dc(lab):
    out = {}
    for node in lab.model["nodes"]:
        if not node["retired"]:
            out.setdefault(node["datacenter"], []).append(node["id"])
    return out


def _servers(lab):
    return [n["id"] for n in lab.model["nodes"]
            if not n["retired"] and "zookeeper" in n["components"]]


AGENT = ("import json, urllib.request; print(json.dumps([json.loads(urllib.request.urlopen("
         "'http://127.0.0.1:8500' + p, timeout=5).read()) for p in {paths!r}]))")


def test_lan_membership_is_per_data_center(mesh):
    lab = mesh
    for dc, nodes in _by_dc(lab).items():
        for node in nodes:
            members = lab.py(node, AGENT.format(paths=["/v1/agent/members"]))[0]
            alive = {m["Name"] for m in members if m["Status"] == 1}
            assert alive == set(nodes), f"{node} ({dc}) sees {sorted(alive)}"


def test_servers_are_federated_over_the_wan(mesh):
    lab = mesh
    dcs = _by_dc(lab)
    servers = set(_servers(lab))
    want = {f"{n['id']}.{n['datacenter']}" for n in lab.model["nodes"] if n["id"] in servers}
    for node in _servers(lab):
        wan = lab.py(node, AGENT.format(paths=["/v1/agent/members?wan=1"]))[0]
        alive = {m["Name"] for m in wan if m["Status"] == 1}
        assert alive == want, f"{node}: WAN members {sorted(alive)}, want {sorted(want)}"
        known = lab.py(node, AGENT.format(paths=["/v1/catalog/datacenters"]))[0]
        assert sorted(known) == sorted(dcs), known


def test_one_leader_per_data_center_agreed_by_every_node(mesh):
    lab = mesh
    for dc, nodes in _by_dc(lab).items():
        leaders = {lab.py(n, AGENT.format(paths=["/v1/status/leader"]))[0] for n in nodes}
        assert len(leaders) == 1 and "" not in leaders, (dc, leaders)
        servers = {lab.ip[n] for n in _servers(lab) if n in nodes}
        assert next(iter(leaders)).rsplit(":", 1)[0] in servers, (dc, leaders)


def test_cross_dc_flows_answer_through_the_mesh(mesh):
    """Every upstream whose destination is in another data center (none in a one-DC
    topology: the planner must not invent any) reaches the right component via the mesh."""
    lab = mesh
    dc_of = {n["id"]: n["datacenter"] for n in lab.model["nodes"]}
    cross = {}
    for node in lab.nodes:
        ups = [u for u in planner.plan(lab.pillar, node)["upstreams"]
               if dc_of[u["node"]] != dc_of[node]]
        assert all(u.get("datacenter") == dc_of[u["node"]] for u in ups), ups
        if ups:
            cross[node] = ups
    if len(_by_dc(lab)) == 1:
        assert cross == {}
        return
    components = {u["component"] for ups in cross.values() for u in ups}
    assert {"cassandra", "postgres"} <= components, components
    for node, ups in cross.items():
        # on a lab with real datastores, Postgres answers in its own protocol
        echo, probed = lab.flow_targets(ups)
        for spec, res in zip(probed, lab.probe(node, probed)):
            assert res.get("ok"), (node, spec, res)
        replies = lab.requests(node, [(u["ip"], u["component_port"], f"xdc {node}")
                                      for u in echo])
        for up, reply in zip(echo, replies):
            assert "error" not in reply, (node, up["service"], reply)
            assert (reply["node"], reply["component"]) == (up["node"], up["component"]), reply
            assert reply["peer"].rsplit(":", 1)[0] in ("127.0.0.1", up["ip"]), reply
    print(json.dumps({n: len(u) for n, u in cross.items()}))
