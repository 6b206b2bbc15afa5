"""A state run ends by checking that the node's agent obtains a Connect leaf certificate
(apigee_mtls.connect_leaf_ready), and a secondary data center's servers get their tokens before
their agent's first start. Consul is replaced by a scripted local agent: what it answers to the
leaf request and who leads, second by second."""

import logging

import pytest

import apigee_mtls_plan as amp  # registered by conftest.py
from conftest import load_salt_module, load_topology

STATES = load_salt_module("_states", "apigee_mtls_states_leaf")
QUIET = logging.getLogger("apigee_mtls_states_leaf.test")
QUIET.propagate = False
QUIET.addHandler(logging.NullHandler())
BROKEN = "HTTP 500: rpc error making call: error parsing CA cert: no PEM-encoded data found"


# --------------------------------------------------------------------------------------------
# planner
def test_only_secondary_servers_get_their_tokens_before_the_agent_starts():
    pillar = load_topology("12-node-2dc")
    before = {n: amp.plan(pillar, n)["acl"]["tokens_before_start"]
              for n in ("n1", "n2", "n4", "n7", "n8", "n9", "n10")}
    # n1-n3 are the primary's servers (their quorum bootstraps the ACLs), n10 a client
    assert before == {"n1": False, "n2": False, "n4": False, "n7": True, "n8": True,
                      "n9": True, "n10": False}
    assert not amp.plan(load_topology("5-node"), "n2")["acl"]["tokens_before_start"]


def test_leaf_check_names_the_data_center_and_heals_only_on_secondary_servers():
    pillar = load_topology("12-node-2dc")
    n8, n10, n2 = (amp.plan(pillar, n)["leaf_check"] for n in ("n8", "n10", "n2"))
    role = amp.plan(pillar, "n8")["egress"]["identity"]
    assert n8 == {"service": role, "datacenter": "dc-2",
                  "primary_datacenter": "dc-1", "servers": ["n7", "n8", "n9"],
                  "heal_secondary_ca": True, "address": "10.77.0.18"}
    assert n10["heal_secondary_ca"] is False and n10["servers"] == ["n7", "n8", "n9"]
    assert n2["heal_secondary_ca"] is False and n2["servers"] == ["n1", "n2", "n3"]


def test_cause_of_a_secondary_without_intermediate_says_what_to_apply():
    text = STATES._leaf_failure_cause(BROKEN, "dc-2", "dc-1", ["n7", "n8", "n9"])
    assert "no intermediate certificate signed by the primary data center dc-1" in text
    assert "Apply apigee_mtls on dc-2's Consul servers (n7, n8, n9)" in text
    # the same error in the primary is not that cause
    assert "intermediate" not in STATES._leaf_failure_cause(BROKEN, "dc-1", "dc-1", ["n1"])
    assert "ACL token" in STATES._leaf_failure_cause("HTTP 403: ACL not found", "dc-2", "dc-1",
                                                    ["n7"])


# --------------------------------------------------------------------------------------------
# the state against a scripted agent
class Agent:
    """The local agent: ``leaf`` answers (an error text or None = issued) per call, the leader
    address, and restarts (each restart makes the next leaf answers come from ``after``)."""

    def __init__(self, leaf, leader="10.77.0.18:8300", after=None, running=True):
        self.leaf, self.leader, self.after, self.running = list(leaf), leader, after, running
        self.restarts = 0
        self.leader_stays = False  # True: this node leads again after its restart

    def api(self, method, path, token=None, body=None, port=8500, timeout=10):
        if not self.running:
            raise STATES_ERROR(None, "local Consul agent not answering: ConnectionRefusedError")
        if path == "/v1/status/leader":
            return self.leader
        assert path.startswith("/v1/agent/connect/ca/leaf/") and method == "GET"
        answer = self.leaf.pop(0) if len(self.leaf) > 1 else self.leaf[0]
        if answer is None:
            return {"CertPEM": "-----BEGIN CERTIFICATE-----", "Service": path.rsplit("/", 1)[1]}
        raise STATES_ERROR(500, answer)

    def restart(self, name):
        assert name == "consul"
        self.restarts += 1
        self.leaf = list(self.after)
        if not self.leader_stays:
            self.leader = "10.77.0.19:8300"
        return True


class _ConsulError(Exception):
    def __init__(self, status, reason):
        super().__init__(f"HTTP {status}: {reason}" if status else reason)
        self.status = status


STATES_ERROR = _ConsulError


@pytest.fixture
def run(monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(STATES, "log", QUIET)
    monkeypatch.setattr(STATES.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(STATES.time, "sleep", lambda s: clock.__setitem__("now",
                                                                        clock["now"] + s))

    def _run(agent, test=False, **kwargs):
        monkeypatch.setattr(STATES, "__opts__", {"id": "n8", "test": test}, raising=False)
        monkeypatch.setattr(STATES, "__salt__", {"service.restart": agent.restart},
                            raising=False)
        monkeypatch.setattr(STATES, "__utils__", {
            "apigee_mtls_acl.api": agent.api,
            "apigee_mtls_acl.read_token": lambda path: "node-token"}, raising=False)
        args = dict(name="egress-10-77-0-18", token_file="/t", datacenter="dc-2",
                    primary_datacenter="dc-1", servers=["n7", "n8", "n9"],
                    heal_secondary_ca=True, address="10.77.0.18")
        args.update(kwargs)
        ret = STATES.connect_leaf_ready(**args)
        ret["seconds"] = clock["now"]
        return ret

    return _run


def test_issued_leaf_is_success_without_changes(run):
    ret = run(Agent([None]))
    assert ret["result"] is True and ret["changes"] == {} and ret["seconds"] == 0
    assert "issued in dc-2" in ret["comment"]


def test_a_leaf_that_comes_during_the_run_is_waited_for(run):
    ret = run(Agent(["HTTP 500: No cluster leader"] * 5 + [None]), heal_secondary_ca=False)
    assert ret["result"] is True and ret["changes"] == {} and ret["seconds"] == 15


def test_secondary_leader_without_intermediate_restarts_once_and_reports_it(run):
    agent = Agent([BROKEN], after=["local Consul agent not answering"] * 2 + [None])
    ret = run(agent)
    assert agent.restarts == 1
    assert ret["result"] is True and "after restarting its leader" in ret["comment"]
    assert "leader of dc-2" in ret["changes"]["consul"]["restarted"]
    assert ret["seconds"] >= 20  # heal_after: a CA initialising right now is not touched


def test_a_follower_or_a_client_never_restarts_and_fails_with_the_cause(run):
    follower = Agent([BROKEN], leader="10.77.0.17:8300")
    ret = run(follower, wait=30)
    assert follower.restarts == 0 and ret["result"] is False and ret["changes"] == {}
    assert "after 30 s" in ret["comment"] and "no PEM-encoded data found" in ret["comment"]
    assert "Apply apigee_mtls on dc-2's Consul servers (n7, n8, n9)" in ret["comment"]
    client = Agent([BROKEN])
    ret = run(client, heal_secondary_ca=False, wait=30)
    assert client.restarts == 0 and ret["result"] is False


def test_the_leader_restarts_only_once_per_run(run):
    agent = Agent([BROKEN], after=[BROKEN])
    agent.leader_stays = True
    ret = run(agent, wait=60)

    assert agent.restarts == 1 and ret["result"] is False
    assert "leader of dc-2" in ret["changes"]["consul"]["restarted"]


def test_test_mode_previews_the_restart_and_does_not_wait(run):
    agent = Agent([BROKEN])
    ret = run(agent, test=True)
    assert ret["result"] is None and ret["seconds"] == 0 and agent.restarts == 0
    assert "restart" in ret["changes"]["consul"] and "would restart" in ret["comment"]
    ret = run(Agent([None]), test=True)
    assert ret["result"] is True and ret["changes"] == {}


def test_test_mode_on_a_node_without_consul_says_so(run):
    ret = run(Agent([BROKEN], running=False), test=True)
    assert ret["result"] is True and ret["changes"] == {}
    assert "checked by the real run" in ret["comment"]


def test_an_agent_not_joined_yet_is_left_to_the_next_run(run):
    """A node just added (README: add a node): its peers' firewalls admit it when they apply;
    its own first run must not fail on that, nor wait the whole ``wait``."""
    agent = Agent(["HTTP 500: rpc error: No known Consul servers"])
    ret = run(agent, heal_secondary_ca=False)
    assert ret["result"] is True and ret["changes"] == {}
    assert "has not joined the cluster" in ret["comment"] and 20 <= ret["seconds"] < 30
