"""A node that was off during a gossip key rotation catches up (issue 16): the planner decides
whether its own keyring file is repaired (only when the pillar key is not its primary key AND
it is cut off from its peers), and what the file then holds (the pillar key first, the keys
already there after it)."""

import importlib.util
import json
import os
import pathlib

import pytest

import apigee_mtls_plan as amp  # registered by conftest.py
from conftest import load_salt_module, load_topology

NEW = amp.gossip_keygen()
OLD = amp.gossip_keygen()
OLDER = amp.gossip_keygen()
PEERS = ["n1", "n2", "n3", "n5"]


# --------------------------------------------------------------------------------------------
# planner: the rule
def test_no_keyring_file_yet_is_left_to_the_first_start():
    out = amp.local_keyring_action(None, NEW, [], PEERS)
    assert out == {"action": "none", "keys": None, "reason": out["reason"]}
    assert "first start" in out["reason"]


@pytest.mark.parametrize("alive", [None, [], PEERS])
def test_pillar_key_primary_needs_nothing_whoever_is_alive(alive):
    out = amp.local_keyring_action([NEW, OLD], NEW, alive, PEERS)
    assert out["action"] == "none" and out["keys"] == [NEW, OLD]


def test_pillar_key_missing_and_peers_not_known_asks_for_them():
    out = amp.local_keyring_action([OLD], NEW, None, PEERS)
    assert out["action"] == "unknown" and out["keys"] == [OLD]


@pytest.mark.parametrize("alive", [["n1", "n2"], PEERS, ["n1", "n2", "n4-self", "retired"]])
def test_a_node_that_still_gossips_is_left_to_the_signers_rotation(alive):
    # half or more of its peers alive: rewriting now would make it encrypt with a key its
    # peers do not have yet
    out = amp.local_keyring_action([OLD], NEW, alive, PEERS)
    assert out["action"] == "none" and out["keys"] == [OLD]
    assert "rotation" in out["reason"]


@pytest.mark.parametrize("alive", [[], ["n1"], ["n1", "stranger", "n4-self"]])
def test_a_cut_off_node_without_the_key_is_repaired_pillar_key_first(alive):
    out = amp.local_keyring_action([OLD], NEW, alive, PEERS)
    assert out["action"] == "repair" and out["keys"] == [NEW, OLD]
    assert "cut off" in out["reason"]


def test_a_cut_off_node_off_between_install_and_use_gets_the_key_made_primary():
    out = amp.local_keyring_action([OLD, NEW], NEW, [], PEERS)
    assert out["action"] == "repair" and out["keys"] == [NEW, OLD]
    assert "not primary" in out["reason"]


def test_repair_keeps_every_other_key_once_in_order():
    out = amp.local_keyring_action([OLD, OLDER, OLD], NEW, [], PEERS)
    assert out["keys"] == [NEW, OLD, OLDER]
    assert amp.keyring_with_primary(None, NEW) == [NEW]
    assert amp.keyring_with_primary([OLD, NEW, OLDER], NEW) == [NEW, OLD, OLDER]


def test_no_expected_peer_is_never_cut_off():
    out = amp.local_keyring_action([OLD], NEW, [], [])
    assert out["action"] == "none"


def test_no_key_in_any_reason():
    cases = [(None, []), ([NEW], []), ([OLD], None), ([OLD], PEERS), ([OLD], []),
             ([OLD, NEW], [])]
    for keys, alive in cases:
        reason = amp.local_keyring_action(keys, NEW, alive, PEERS)["reason"]
        assert NEW not in reason and OLD not in reason


# --------------------------------------------------------------------------------------------
# planner: the peers a node expects in its LAN pool
def test_keyring_peers_are_the_data_centers_other_active_nodes():
    pillar = load_topology("12-node-2dc")
    assert amp.plan(pillar, "n8")["keyring"] == {
        "peers": ["n7", "n9", "n10", "n11", "n12"], "server": True}
    assert amp.plan(pillar, "n4")["keyring"] == {
        "peers": ["n1", "n2", "n3", "n5", "n6"], "server": False}


def test_a_retired_node_is_nobodys_peer():
    pillar = load_topology("5-node")
    pillar["nodes"][-1]["retired"] = True
    gone = pillar["nodes"][-1]["id"]
    assert amp.plan(pillar, gone)["keyring"] is None
    assert gone not in amp.plan(pillar, pillar["nodes"][0]["id"])["keyring"]["peers"]


# --------------------------------------------------------------------------------------------
# the state, against a scripted local agent and a keyring in a temporary data dir
STATES = load_salt_module("_states", "apigee_mtls_states_local_keyring")
_spec = importlib.util.spec_from_file_location(
    "apigee_mtls_acl_local_keyring",
    pathlib.Path(__file__).resolve().parents[2] / "_utils" / "apigee_mtls_acl.py")
ACL = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ACL)
ME = "n4"


class Agent:
    """The local agent and its unit: ``alive`` is what ``/v1/agent/members`` shows alive, per
    call (the last answer repeats), before the restart, and ``after`` after it; ``running``
    False: the HTTP API does not answer; ``show_me`` False: the answer lacks this node (a
    token without node:read)."""

    def __init__(self, alive, after=None, running=True, show_me=True):
        self.alive, self.after = [list(a) for a in alive], [list(a) for a in after or [PEERS]]
        self.running, self.show_me = running, show_me
        self.calls, self.tokens = [], []
        self.restart_ok = True

    def api(self, method, path, token=None, body=None, port=8500, timeout=10):
        assert (method, path) == ("GET", "/v1/agent/members")
        self.tokens.append(token)
        if not self.running:
            raise ACL.ConsulError(None, "local Consul agent not answering: ConnectionRefused")
        script = self.after if "restart" in self.calls else self.alive
        alive = script.pop(0) if len(script) > 1 else script[0]
        members = [{"Name": n, "Status": 1 if n in alive else 4} for n in PEERS]
        return members + ([{"Name": ME, "Status": 1}] if self.show_me else [])

    def restart(self, name):
        assert name == "consul"
        self.calls.append("restart")
        return self.restart_ok


class Log:
    def __init__(self):
        self.lines = []

    def _add(self, msg, *args, **kwargs):
        self.lines.append(msg % args if args else msg)

    warning = info = debug = error = _add


@pytest.fixture
def node(tmp_path, monkeypatch):
    """n4's data dir with a keyring holding only OLD, the pillar holding NEW; returns
    ``run(agent, test=False, **kwargs) -> ret`` with ``ret["seconds"]`` the time it took."""
    serf = tmp_path / "serf"
    serf.mkdir()
    (serf / "local.keyring").write_text(json.dumps([OLD]))
    clock = {"now": 0.0}
    log = Log()
    monkeypatch.setattr(STATES, "log", log)
    monkeypatch.setattr(STATES.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(STATES.time, "sleep",
                        lambda s: clock.__setitem__("now", clock["now"] + s))
    monkeypatch.setattr(STATES, "_ids", lambda user, group: (os.getuid(), os.getgid()))

    def run(agent, test=False, plan=None, **kwargs):
        def write(path, text, uid, gid, mode=0o600):
            agent.calls.append(f"write {pathlib.Path(path).name} {oct(mode)}")
            ACL.write_secret(path, text, uid, gid, mode)

        monkeypatch.setattr(STATES, "__opts__", {"id": ME, "test": test}, raising=False)
        monkeypatch.setattr(STATES, "__salt__", {
            "pillar.get": lambda path, default=None, unmask=False: (
                NEW if path == "apigee_mtls:secrets:gossip_key" else default),
            "apigee_mtls.plan": lambda: dict(plan, member=True) if plan else pytest.fail(
                "the plan was read though peers were given"),
            "service.restart": agent.restart}, raising=False)
        monkeypatch.setattr(STATES, "__utils__", {
            "apigee_mtls_plan.local_keyring_action": amp.local_keyring_action,
            "apigee_mtls_plan.keyring_with_primary": amp.keyring_with_primary,
            "apigee_mtls_acl.api": agent.api,
            "apigee_mtls_acl.read_token": lambda path: "agent-master-token",
            "apigee_mtls_acl.write_secret": write}, raising=False)
        args = dict(name="keyring-local", data_dir=str(tmp_path),
                    peers=None if plan else PEERS)
        args.update(kwargs)
        clock["now"] = 0.0
        ret = STATES.local_keyring_managed(**args)
        for secret in (NEW, OLD):
            assert secret not in repr(ret), "a gossip key in the state return"
            assert not any(secret in line for line in log.lines), "a gossip key in the log"
        ret["seconds"] = clock["now"]
        return ret

    run.serf = serf
    return run


def _keys(path):
    return json.loads(path.read_text())


def test_test_mode_changes_nothing_and_says_would(node):
    agent = Agent([[]])
    ret = node(agent, test=True)
    assert ret["result"] is None and ret["comment"].startswith("Would make ")
    assert "restart consul" in ret["comment"] and "cut off" in ret["comment"]
    assert ret["changes"]["primary"] == STATES._fingerprint(NEW)
    assert ret["changes"]["kept"] == [STATES._fingerprint(OLD)]
    assert agent.calls == [] and _keys(node.serf / "local.keyring") == [OLD]
    assert ret["seconds"] == 0  # test mode looks once, does not wait


def test_a_cut_off_node_stops_writes_pillar_key_first_and_starts(node):
    agent = Agent([[]], after=[[], ["n1", "n2", "n3"]])
    ret = node(agent, token_file="/etc/consul.d/acl/agent-master.token")
    assert ret["result"] is True, ret["comment"]
    # written while the agent is stopped, created 0600
    assert agent.calls == ["write local.keyring 0o600", "restart"]
    lan = node.serf / "local.keyring"
    assert _keys(lan) == [NEW, OLD]
    assert lan.stat().st_mode & 0o777 == 0o600
    assert ret["changes"] == {"primary": STATES._fingerprint(NEW),
                              "kept": [STATES._fingerprint(OLD)], "files": [str(lan)],
                              "reason": ret["changes"]["reason"], "restart": "consul"}
    assert "sees 0 of its 4 peers alive: it is cut off" in ret["changes"]["reason"]
    assert "it now sees 3 of its 4 peers alive" in ret["comment"]
    # it waited `wait` seconds for peers before deciding, with the agent's local master token
    assert ret["seconds"] >= 20
    assert set(agent.tokens) == {"agent-master-token"}


def test_a_server_also_repairs_its_wan_keyring(node):
    (node.serf / "remote.keyring").write_text(json.dumps([OLD, OLDER]))
    ret = node(Agent([[]]), server=True)
    assert ret["result"] is True
    assert _keys(node.serf / "local.keyring") == [NEW, OLD]
    assert _keys(node.serf / "remote.keyring") == [NEW, OLD, OLDER]
    assert ret["changes"]["files"] == [str(node.serf / "local.keyring"),
                                       str(node.serf / "remote.keyring")]


def test_a_client_leaves_a_wan_keyring_alone(node):
    (node.serf / "remote.keyring").write_text(json.dumps([OLD]))
    ret = node(Agent([[]]), server=False)
    assert ret["result"] is True and _keys(node.serf / "remote.keyring") == [OLD]


def test_no_action_when_peers_are_alive(node):
    agent = Agent([["n1", "n2"]])
    ret = node(agent)
    assert ret["result"] is True and ret["changes"] == {} and agent.calls == []
    assert "gossips with 2 of its 4 peers" in ret["comment"]
    assert ret["seconds"] == 0 and _keys(node.serf / "local.keyring") == [OLD]


def test_peers_that_appear_during_the_wait_mean_no_action(node):
    # the agent was just started by service.running: it rejoins within seconds
    agent = Agent([[], [], ["n1"], PEERS])
    ret = node(agent)
    assert ret["result"] is True and ret["changes"] == {} and agent.calls == []
    assert 0 < ret["seconds"] < 20


def test_pillar_key_primary_asks_nothing(node):
    (node.serf / "local.keyring").write_text(json.dumps([NEW, OLD]))
    agent = Agent([[]], running=False)
    ret = node(agent)
    assert ret["result"] is True and ret["changes"] == {} and agent.tokens == []
    assert "primary key" in ret["comment"]


def test_no_keyring_file_is_left_to_the_first_start(node):
    (node.serf / "local.keyring").unlink()
    agent = Agent([[]])
    ret = node(agent)
    assert ret["result"] is True and ret["changes"] == {} and agent.tokens == []
    assert not (node.serf / "local.keyring").exists()


def test_an_agent_that_does_not_answer_fails_without_touching_anything(node):
    agent = Agent([[]], running=False)
    ret = node(agent, wait=10)
    assert ret["result"] is False and ret["changes"] == {} and agent.calls == []
    assert "cannot be told" in ret["comment"] and "not answering" in ret["comment"]
    assert _keys(node.serf / "local.keyring") == [OLD]
    ret = node(Agent([[]], running=False), test=True)
    assert ret["result"] is True and ret["comment"].startswith("Could not check")


def test_a_member_list_without_this_node_is_not_taken_for_a_cut_off_node(node):
    # with ACLs, a token without node:read sees no member at all
    agent = Agent([[]], show_me=False)
    ret = node(agent, wait=4)
    assert ret["result"] is False and agent.calls == []
    assert "does not show n4 itself" in ret["comment"]
    assert _keys(node.serf / "local.keyring") == [OLD]


def test_a_failed_restart_is_a_failure_that_says_the_file_was_written(node):
    """The files are written while the agent runs (a cut-off Consul exits 1 on SIGTERM and
    systemd's Restart=on-failure would cancel a separate stop), then it restarts."""
    agent = Agent([[]])
    agent.restart_ok = False
    ret = node(agent)
    assert ret["result"] is False and "starting consul failed" in ret["comment"]
    assert ret["changes"]["files"] == [str(node.serf / "local.keyring")]


def test_an_unreadable_keyring_fails_and_says_what_to_do(node):
    (node.serf / "local.keyring").write_text("not json")
    ret = node(Agent([[]]))
    assert ret["result"] is False and "encrypt.json" in ret["comment"]


def test_peers_and_server_come_from_the_plan_when_not_given(node):
    (node.serf / "remote.keyring").write_text(json.dumps([OLD]))
    plan = amp.plan(load_topology("5-node"), "n2")  # a server
    plan["keyring"]["peers"] = PEERS  # as n4 sees them: this test's agent answers for n4
    agent = Agent([[]])
    ret = node(agent, plan=plan)
    assert ret["result"] is True
    assert agent.calls == ["write local.keyring 0o600", "write remote.keyring 0o600",
                           "restart"]
    assert _keys(node.serf / "remote.keyring") == [NEW, OLD]


def test_a_retired_node_has_no_keyring_to_keep(node):
    pillar = load_topology("5-node")
    pillar["nodes"][3]["retired"] = True
    agent = Agent([[]])
    ret = node(agent, plan=amp.plan(pillar, ME))
    assert ret["result"] is True and ret["changes"] == {} and agent.calls == []
    assert "retired" in ret["comment"]
