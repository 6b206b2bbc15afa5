"""Role identities for the egress proxies, and an identity change without a failed
connection: the rules (apigee_mtls_restart's draining_egress, egress_listeners,
egress_connections, switch_refusals) and the three states that apply them
(egress_draining, egress_switch_ready, egress_drained) over a fake node."""
import json
import os
import sys

import pytest

import apigee_mtls_plan as amp  # registered by conftest.py
from conftest import TOPOLOGY_NAMES, load_salt_module, load_topology, salt_file_functions

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "_utils"))
import apigee_mtls_restart as rs  # noqa: E402  pylint: disable=wrong-import-position

STATES = load_salt_module("_states", "apigee_mtls_states_egress")
OLD_ID = "egress-10-77-0-11"


def _svc(sid, kind="egress", upstreams=(), address="127.0.0.1"):
    return {"id": sid, "name": sid, "meta": {"apigee_mtls": kind}, "token": "secret-token",
            "connect": {"sidecar_service": {"proxy": {"upstreams": [
                {"destination_name": d, "local_bind_address": address, "local_bind_port": p}
                for d, p in upstreams]}}}}


# --------------------------------------------------------------------------------------------
# names
def test_identity_is_the_component_set_in_catalog_order():
    assert amp.egress_identity(["openldap", "management-server"]) == "egress-ms-ldap"
    assert amp.egress_identity(["router", "message-processor"]) == \
        amp.egress_identity(["message-processor", "router"]) == "egress-rt-mp"
    assert amp.egress_service_id("egress-rt-mp", "10.77.0.20") == "egress-rt-mp-10-77-0-20"


def test_a_pillar_short_name_names_the_identity():
    model = amp.normalize(load_topology("5-node"))
    catalog = {k: dict(v) for k, v in model["components"].items()}
    catalog["qpid"]["short"] = "broker"
    assert amp.egress_identity(["qpid", "postgres"], catalog) == "egress-broker-pg"


@pytest.mark.parametrize("topology", TOPOLOGY_NAMES)
def test_bind_addresses_are_loopback_never_127_0_and_distinct_per_role(topology):
    pillar = load_topology(topology)
    roles = {amp.egress_identity(n["components"]) for n in pillar["nodes"]}
    addresses = {amp.egress_bind_address(r) for r in roles}
    assert len(addresses) == len(roles)
    for address in addresses:
        parts = [int(p) for p in address.split(".")]
        assert parts[0] == 127 and 1 <= parts[1] <= 254 and 1 <= parts[3] <= 254, address
    assert amp.egress_bind_address("egress-ms-ldap") == amp.egress_bind_address("egress-ms-ldap")


def test_nodes_of_one_role_share_the_identity_not_the_instance(topo5):
    n4, n5 = (amp.plan(topo5, n)["egress"] for n in ("n4", "n5"))
    assert n4["identity"] == n5["identity"] == "egress-qpid-pg"
    assert n4["id"] != n5["id"] and n4["unit"] != n5["unit"]
    assert n4["bind_address"] == n5["bind_address"]


def test_the_listener_plan_carries_the_egress_bind_address(topo5):
    plan = amp.plan(topo5, "n1")
    listeners = {entry["id"]: entry for entry in plan["listeners"]}
    egress = listeners[plan["egress"]["id"]]
    assert egress["listener"]["local_bind_address"] == plan["egress"]["bind_address"]
    assert egress["upstreams"] == {u["service"]: u["proxy_port"] for u in plan["upstreams"]}
    assert all("local_bind_address" not in entry["listener"]
               for sid, entry in listeners.items() if sid != plan["egress"]["id"])


# --------------------------------------------------------------------------------------------
# rules
def test_the_previous_egress_is_kept_only_while_its_proxy_runs():
    services = {"services": [_svc("zk-2181-x", "ingress"), _svc(OLD_ID), _svc("egress-zk-x")]}
    assert rs.draining_egress(services, None, "egress-zk-x", {OLD_ID}) == [_svc(OLD_ID)]
    assert rs.draining_egress(services, None, "egress-zk-x", set()) == []
    # already in the draining file (a run after the services file was rewritten)
    later = {"services": [_svc("zk-2181-x", "ingress"), _svc("egress-zk-x")]}
    assert rs.draining_egress(later, {"services": [_svc(OLD_ID)]}, "egress-zk-x",
                              {OLD_ID}) == [_svc(OLD_ID)]
    assert rs.draining_egress(None, None, "egress-zk-x", {OLD_ID}) == []


def test_connections_are_counted_on_the_proxy_s_own_listeners():
    legacy = {"upstreams": {"zk": 10001}, "bound": {"10001": "zk", "10400": "qpid"}}
    assert rs.egress_listeners(legacy) == ("127.0.0.1", [10001, 10400])
    role = dict(legacy, local_bind_address="127.9.9.9")
    sockets = [{"local_ip": "127.0.0.1", "local_port": 10400, "peer_ip": "10.0.0.1",
                "peer_port": 40000},
               {"local_ip": "127.9.9.9", "local_port": 10001, "peer_ip": "10.0.0.1",
                "peer_port": 40001},
               {"local_ip": "127.0.0.1", "local_port": 8500, "peer_ip": "127.0.0.1",
                "peer_port": 40002}]
    assert rs.egress_connections(legacy, sockets) == 1
    assert rs.egress_connections(role, sockets) == 1
    assert rs.egress_connections(None, sockets) == 0


def test_only_a_refusal_the_old_proxy_does_not_have_blocks_the_switch():
    assert rs.switch_refusals({"a": True, "b": False, "c": False},
                              {"b": True, "c": False}) == ["b"]
    assert rs.switch_refusals({"a": False}, {}) == []


# --------------------------------------------------------------------------------------------
# states over a fake node
class Node:
    """systemd units, sockets, the live nat chain and the probes, as the states see them."""

    def __init__(self):
        self.active = {"apigee-mtls-proxy@" + OLD_ID, "apigee-mtls-proxy@egress-zk-x"}
        self.enabled = set(self.active)
        self.sockets = ""
        self.nat = "-A APIGEE-MTLS-OUT -d 10.77.0.12/32 -p tcp -j REDIRECT --to-ports 10001\n"
        self.allowed = {"new": set(), "old": {"zk-2181-y"}}
        self.listening = []
        self.stopped, self.reloads = [], 0

    def salt(self, chowned):
        def run_stdout(cmd, **_):
            if cmd[:2] == ["ss", "-Hltn"]:
                return "\n".join(f"LISTEN 0 128 {a} 0.0.0.0:*" for a in self.listening)
            return self.nat

        def run_all(cmd, **_):
            if cmd[0] == "ss":
                return {"retcode": 0, "stdout": self.sockets, "stderr": ""}
            self.reloads += cmd[1:2] == ["reload"]
            return {"retcode": 0, "stdout": "", "stderr": ""}

        def probe(port, address, timeout):
            side = "old" if address == "127.0.0.1" else "new"
            return {"ok": {10001: "zk-2181-y"}.get(port) in self.allowed[side]}

        def stop(unit):
            self.active.discard(unit)
            self.stopped.append(unit)
            return True

        return dict(salt_file_functions(chowned), **{
            "service.get_running": lambda: sorted(self.active),
            "service.get_enabled": lambda: sorted(self.enabled),
            "service.status": lambda unit: unit in self.active,
            "service.stop": stop,
            "service.disable": lambda unit: self.enabled.discard(unit) or True,
            "cmd.run_stdout": run_stdout, "cmd.run_all": run_all,
            "apigee_mtls.probe_upstream": probe})


@pytest.fixture
def node(monkeypatch, tmp_path):
    fake = Node()
    chowned = []
    monkeypatch.setattr(STATES, "__salt__", fake.salt(chowned), raising=False)
    monkeypatch.setattr(STATES, "__opts__", {"test": False}, raising=False)
    monkeypatch.setattr(STATES, "__utils__", {
        "apigee_mtls_restart." + name: getattr(rs, name)
        for name in ("draining_egress", "egress_listeners", "egress_connections",
                     "switch_refusals")} | {
        "apigee_mtls_plan.parse_ss_established": amp.parse_ss_established}, raising=False)
    monkeypatch.setattr(STATES.time, "sleep", lambda s: None)
    fake.dir = tmp_path
    fake.chowned = chowned
    services = {"services": [_svc("zk-2181-x", "ingress"),
                             _svc(OLD_ID, upstreams=[("zk-2181-y", 10001)])]}
    (tmp_path / "services.json").write_text(json.dumps(services))
    (tmp_path / "listeners").mkdir()
    (tmp_path / "listeners" / (OLD_ID + ".json")).write_text(json.dumps(
        {"upstreams": {"zk-2181-y": 10001}, "bound": {"10001": "zk-2181-y"}}))
    return fake


def _draining(node, test=False):
    STATES.__opts__["test"] = test
    return STATES.egress_draining(str(node.dir / "draining.json"),
                                  str(node.dir / "services.json"), "egress-zk-x")


def test_draining_copies_the_old_definition_token_and_all_and_shows_no_content(node):
    preview = _draining(node, test=True)
    assert preview["result"] is None and not (node.dir / "draining.json").exists()
    ret = _draining(node)
    assert ret["result"] is True
    assert ret["changes"] == {"draining": {"old": [], "new": [OLD_ID]}}
    assert "secret-token" not in json.dumps(ret)
    written = json.loads((node.dir / "draining.json").read_text())
    assert written["services"][0]["token"] == "secret-token"
    assert oct(os.stat(node.dir / "draining.json").st_mode & 0o777) == "0o640"
    assert _draining(node)["changes"] == {}  # idempotent


def _switch(node, wait=0):
    return STATES.egress_switch_ready("egress-zk-x", "127.8.8.8", {"zk-2181-y": 10001},
                                      str(node.dir / "draining.json"), wait=wait)


def test_the_switch_waits_for_the_new_identity_s_intentions(node):
    assert "No previous egress proxy" in _switch(node)["comment"]  # a fresh node
    _draining(node)
    node.listening = ["127.8.8.8:10001"]
    ret = _switch(node)
    assert ret["result"] is False and "zk-2181-y" in ret["comment"]
    assert "New connections stay on the previous egress proxy" in ret["comment"]
    node.allowed["new"].add("zk-2181-y")  # the signer wrote the role's intentions
    ret = _switch(node)
    assert ret["result"] is True and ret["changes"] == {}
    node.nat = "-A APIGEE-MTLS-OUT -j DNAT --to-destination 127.8.8.8:10001\n"
    assert "already go to" in _switch(node)["comment"]


def test_the_switch_waits_for_the_listeners(node):
    _draining(node)
    node.allowed["new"].add("zk-2181-y")
    ret = _switch(node)
    assert ret["result"] is False and "did not listen on 127.8.8.8" in ret["comment"]


def _drained(node, test=False):
    STATES.__opts__["test"] = test
    return STATES.egress_drained(str(node.dir / "draining.json"), "egress-zk-x",
                                 str(node.dir / "listeners"), "/usr/bin/consul")


def test_the_old_proxy_stops_only_when_nothing_uses_it(node):
    _draining(node)
    ret = _drained(node)  # the nat rules still send new connections to it
    assert ret["changes"] == {} and "still send new connections" in ret["comment"]
    node.nat = "-A APIGEE-MTLS-OUT -j DNAT --to-destination 127.8.8.8:10001\n"
    node.sockets = "0 0 127.0.0.1:10001 10.77.0.11:40000\n"
    ret = _drained(node)
    assert ret["changes"] == {} and "1 connections open" in ret["comment"]
    node.sockets = ""
    preview = _drained(node, test=True)
    assert preview["result"] is None and not node.stopped
    ret = _drained(node)
    assert ret["result"] is True
    assert ret["changes"] == {"stopped": ["apigee-mtls-proxy@" + OLD_ID]}
    assert node.stopped == ["apigee-mtls-proxy@" + OLD_ID] and node.reloads == 1
    assert not (node.dir / "draining.json").exists()
    assert not (node.dir / "listeners" / (OLD_ID + ".json")).exists()
    assert _drained(node)["changes"] == {}
