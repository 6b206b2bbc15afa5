"""A change of consul.json reloads the agent when Consul 1.8 can reload every changed key,
waits for the next start for keys read only at start, and restarts it otherwise
(planner: agent_config_action; state: apigee_mtls.agent_config_managed)."""
import json
import os

import pytest

import apigee_mtls_plan as amp  # registered by conftest.py
from conftest import load_salt_module, load_topology

STATES = load_salt_module("_states", "apigee_mtls_states_agent_config")


def _config(node="n2", **changes):
    pillar = load_topology("5-node")
    pillar.setdefault("consul", {}).update(changes)
    return amp.plan(pillar, node)["consul_config"]


@pytest.mark.parametrize("change, action, keys", [
    ({"log_level": "DEBUG"}, "reload", ["log_level"]),
    ({"verify_incoming": False}, "reload", ["verify_incoming"]),
    ({"retry_join": ["10.77.0.99"]}, "next_start", ["retry_join"]),
    ({"bootstrap_expect": 5}, "next_start", ["bootstrap_expect"]),
    ({"datacenter": "dc-9"}, "restart", ["datacenter"]),
    ({"ports": {"http": 8500, "https": 8501, "grpc": 8502, "dns": 8600}}, "restart",
     ["ports"]),
    # a reloadable key beside a restart-only key: the restart wins
    ({"log_level": "DEBUG", "server": False}, "restart", ["log_level", "server"]),
    ({"log_level": "DEBUG", "retry_join": []}, "reload", ["log_level", "retry_join"]),
])
def test_action_follows_what_consul_reloads(change, action, keys):
    old = _config()
    new = dict(old, **change)
    assert amp.agent_config_action(old, new) == {"action": action, "keys": keys}


def test_pillar_log_level_edit_is_a_reload_and_nothing_else():
    assert amp.agent_config_action(_config(), _config(log_level="DEBUG")) == {
        "action": "reload", "keys": ["log_level"]}
    assert amp.agent_config_action(_config(), _config())["action"] == "none"
    assert amp.agent_config_action(None, _config())["action"] == "start"


class Node:
    """consul.json on disk, the agent's unit, and what the state asked of them."""

    def __init__(self, tmp_path, content=None, running=True, reload_rc=0):
        self.path = tmp_path / "consul.json"
        if content is not None:
            self.path.write_text(json.dumps(content))
        self.running, self.reload_rc = running, reload_rc
        self.marker = str(tmp_path / "run" / "consul-restart-needed")
        self.calls = []

    def serialize(self, name, dataset, serializer, user, group, mode):
        assert serializer == "json"
        old = self.path.read_text() if self.path.exists() else None
        new = json.dumps(dataset, indent=4)
        changes = {} if old is not None and json.loads(old) == dataset else {"diff": "..."}
        if changes and not STATES.__opts__["test"]:
            self.path.write_text(new)
        return {"name": name, "result": None if changes and STATES.__opts__["test"] else True,
                "changes": changes, "comment": ""}

    def run_all(self, cmd, env=None, python_shell=False, ignore_retcode=False):
        self.calls.append(("reload", cmd[1], env))
        return {"retcode": self.reload_rc, "stdout": "", "stderr": "agent not ready"}

    def restart(self, name):
        self.calls.append(("restart", name))
        return True


@pytest.fixture
def state(monkeypatch):
    monkeypatch.setattr(STATES.time, "sleep", lambda s: None)

    def _run(node, config, test=False):
        monkeypatch.setattr(STATES, "__opts__", {"test": test}, raising=False)
        monkeypatch.setattr(STATES, "__utils__", {
            "apigee_mtls_plan.agent_config_action": amp.agent_config_action}, raising=False)
        monkeypatch.setattr(STATES, "__states__", {"file.serialize": node.serialize},
                            raising=False)
        def write(path, text):
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
            return "Wrote 1 lines to " + path

        monkeypatch.setattr(STATES, "__salt__", {
            "service.status": lambda name: node.running, "cmd.run_all": node.run_all,
            "service.restart": node.restart, "file.write": write,
            "file.mkdir": lambda path, mode=None: os.makedirs(path, exist_ok=True)},
            raising=False)
        return STATES.agent_config_managed(str(node.path), config,
                                           token_file="/etc/consul.d/acl/agent-master.token",
                                           restart_marker=node.marker)

    return _run


def test_log_level_change_reloads_with_the_local_master_token(tmp_path, state):
    node = Node(tmp_path, _config())
    ret = state(node, _config(log_level="DEBUG"))
    assert ret["result"] is True
    assert ret["changes"]["consul"] == {"keys": ["log_level"], "agent": "reload"}
    assert node.calls == [("reload", "reload",
                           {"CONSUL_HTTP_TOKEN_FILE": "/etc/consul.d/acl/agent-master.token"})]
    assert json.loads(node.path.read_text())["log_level"] == "DEBUG"


def test_datacenter_change_marks_a_restart_for_agent_current(tmp_path, state):
    """A key Consul cannot reload is not restarted here, at once on every node: the keys go
    to the restart marker, and apigee_mtls.agent_current restarts the agent later in the run,
    servers one at a time."""
    node = Node(tmp_path, _config())
    ret = state(node, dict(_config(), datacenter="dc-9"))
    assert ret["result"] is True and ret["changes"]["consul"]["agent"] == "restart"
    assert node.calls == [] and json.loads(open(node.marker).read()) == ["datacenter"]
    assert "agent_current" in ret["comment"]


def test_start_only_key_is_written_for_the_next_start(tmp_path, state):
    node = Node(tmp_path, _config())
    ret = state(node, dict(_config(), retry_join=["10.77.0.99"]))
    assert ret["result"] is True and node.calls == []
    assert ret["changes"]["consul"]["agent"] == "next_start"


def test_a_stopped_agent_is_not_reloaded_it_reads_the_file_when_it_starts(tmp_path, state):
    node = Node(tmp_path, _config(), running=False)
    ret = state(node, _config(log_level="DEBUG"))
    assert ret["changes"]["consul"]["agent"] == "start" and node.calls == []
    (tmp_path / "fresh").mkdir()
    fresh = Node(tmp_path / "fresh", running=False)
    ret = state(fresh, _config())
    assert ret["changes"]["consul"]["agent"] == "start" and fresh.calls == []


def test_test_mode_previews_the_reload_and_touches_nothing(tmp_path, state):
    node = Node(tmp_path, _config())
    before = node.path.read_text()
    ret = state(node, _config(log_level="DEBUG"), test=True)
    assert ret["result"] is None and ret["comment"].endswith("Consul would reload")
    assert ret["changes"]["consul"] == {"keys": ["log_level"], "agent": "reload"}
    assert node.calls == [] and node.path.read_text() == before
    ret = state(node, dict(_config(), server=False), test=True)
    assert ret["comment"].endswith("Consul would restart")


def test_unchanged_file_is_no_change(tmp_path, state):
    node = Node(tmp_path, _config())
    ret = state(node, _config())
    assert ret == {"name": str(node.path), "result": True, "changes": {},
                   "comment": f"{node.path} is up to date"}


def test_a_failed_reload_is_reported(tmp_path, state):
    node = Node(tmp_path, _config(), reload_rc=1)
    ret = state(node, _config(log_level="DEBUG"))
    assert ret["result"] is False and "consul reload failed: agent not ready" in ret["comment"]
