"""The states' contract (``_states/apigee_mtls.py``) where Consul answers badly: a failed
intention write is ``result: False`` with the error and what was written; a keyring rotation
that fails midway keeps the changes of the steps that ran; ``test=True`` says "could not
check" rather than "valid" when the local agent does not answer; the ACL token state takes
its signer and policy as arguments. Consul is a fake in memory."""

import json
import logging
import os
import threading

import pytest

import apigee_mtls_plan as amp  # registered by conftest.py
from conftest import load_salt_module, load_topology, salt_file_functions

STATES = load_salt_module("_states", "apigee_mtls_states_contract")
QUIET = logging.getLogger("apigee_mtls_states_contract.test")
QUIET.propagate = False
QUIET.addHandler(logging.NullHandler())
KEY = amp.gossip_keygen()
OLD = amp.gossip_keygen()


class ConsulError(Exception):
    """What py-consul and apigee_mtls_acl.api raise: an HTTP status."""

    def __init__(self, status, text):
        super().__init__(f"HTTP {status}: {text}")
        self.status = status


class FakeHTTP:
    """py-consul's ``client.http`` over intentions and the keyring; ``fail`` maps a (method,
    path) to how many more calls succeed before every next one raises a 500."""

    def __init__(self, intentions=(), keyring=None):
        self.intentions = {f"id-{i}": dict(it, ID=f"id-{i}") for i, it in enumerate(intentions)}
        self.keyring = keyring or []
        self.fail, self.calls, self.bodies = {}, [], []
        self.registered = {"dc-1": {}, "dc-2": {}}
        self.lock = threading.Lock()

    def _call(self, method, path):
        with self.lock:
            self._count(method, path)

    def _count(self, method, path):
        self.calls.append((method, path))
        for (m, p), ok in self.fail.items():
            if m == method and path.startswith(p):
                if ok <= 0:
                    raise ConsulError(500, "rpc error: no leader")
                self.fail[(m, p)] = ok - 1

    def get(self, callback, path, params=None, headers=None):
        self._call("GET", path)
        if path == "/v1/operator/keyring":
            return self.keyring
        if path == "/v1/catalog/datacenters":
            return sorted(self.registered)
        if path.startswith("/v1/catalog/service/"):
            return [{"Node": node} for node in
                    self.registered[dict(params)["dc"]].get(path.rsplit("/", 1)[1], [])]
        return list(self.intentions.values())

    def post(self, callback, path, data=None, headers=None):
        self._call("POST", path)
        with self.lock:
            self.bodies.append(json.loads(data))
        return True

    def put(self, callback, path, data=None, headers=None):
        self._call("PUT", path)
        return True

    def delete(self, callback, path, data=None, headers=None):
        self._call("DELETE", path)
        return True


class FakeClient:
    def __init__(self, http):
        self.http = http

    def prepare_headers(self, token):
        return {"X-Consul-Token": token} if token else {}


@pytest.fixture
def consul(monkeypatch):
    http = FakeHTTP()
    monkeypatch.setattr(STATES, "_client", lambda ret, url: FakeClient(http))
    monkeypatch.setattr(STATES, "__opts__", {"id": "n1", "test": False}, raising=False)
    monkeypatch.setattr(STATES, "log", QUIET)
    monkeypatch.setattr(STATES.time, "sleep", lambda seconds: None)
    return http


# --------------------------------------------------------------------------------------------
# intentions_managed
WANT = [{"source": "*", "destination": "*", "action": "deny"},
        {"source": "egress-a", "destination": "zk-b", "action": "allow"},
        {"source": "egress-a", "destination": "pg-b", "action": "allow"}]


def test_a_failed_intention_write_is_a_failure_with_the_error(consul, monkeypatch):
    monkeypatch.setattr(STATES, "INTENTION_WRITERS", 1)  # which write fails: deterministic
    consul.fail[("POST", "/v1/connect/intentions")] = 1  # the first allow only
    ret = STATES.intentions_managed("intentions", WANT, wait=0)
    assert ret["result"] is False
    assert ret["comment"].startswith("Writing intention egress-a -> zk-b failed: HTTP 500")
    assert "1 of 3 written" in ret["comment"]
    assert ret["changes"] == {"created": ["egress-a -> pg-b (allow)"]}
    # (the deny's wave never started)
    # the deny was never written before the allows it guards
    assert [c for c in consul.calls if c[0] == "POST"] == [
        ("POST", "/v1/connect/intentions")] * 2


def test_intentions_written_all_report_all(consul):
    ret = STATES.intentions_managed("intentions", WANT, wait=0)
    assert ret["result"] is True and len(ret["changes"]["created"]) == 3


def test_many_intentions_are_written_in_parallel_allows_before_the_deny(consul):
    want = [WANT[0]] + [{"source": f"egress-r{i % 7}", "destination": f"svc-{i}",
                         "action": "allow"} for i in range(300)]
    ret = STATES.intentions_managed("intentions", want, wait=0)
    assert ret["result"] is True and len(ret["changes"]["created"]) == 301
    actions = [b["Action"] for b in consul.bodies]
    assert actions[-1] == "deny" and actions.count("deny") == 1


def _managed(source, dest, action="allow"):
    return {"SourceName": source, "DestinationName": dest, "Action": action,
            "Meta": {"managed-by": "apigee_mtls"}}


def test_stale_allows_of_a_registered_identity_are_kept_until_it_is_gone(consul):
    """The move to role identities: the per-node identity of a node whose old egress proxy
    still drains (registered in dc-2's catalog here) keeps its allows; another stale one,
    with no instance left, is removed; the next run after the old proxy stopped removes the
    rest."""
    consul.intentions = {
        "id-0": dict(_managed("*", "*", "deny"), ID="id-0"),
        "id-1": dict(_managed("egress-10-77-0-11", "zk-b"), ID="id-1"),
        "id-2": dict(_managed("egress-10-77-0-12", "zk-b"), ID="id-2"),
    }
    consul.intentions["id-4"] = dict(_managed("egress-ms", "zk-gone"), ID="id-4")
    consul.registered["dc-2"] = {"egress-10-77-0-11": ["n1"], "egress-ms": ["n2"],
                                 "consul": ["n1"]}
    want = [WANT[0], {"source": "egress-ms", "destination": "zk-b", "action": "allow"}]
    ret = STATES.intentions_managed("intentions", want, wait=0)
    assert ret["result"] is True
    # a planned identity's allow to a destination that left goes at once
    assert ret["changes"] == {"created": ["egress-ms -> zk-b (allow)"],
                              "removed": ["egress-10-77-0-12 -> zk-b (remove)",
                                          "egress-ms -> zk-gone (remove)"]}
    assert "kept 1 allows of identity still registered (draining): egress-10-77-0-11" \
        in ret["comment"]
    assert ("DELETE", "/v1/connect/intentions/id-1") not in consul.calls
    consul.registered["dc-2"] = {"consul": ["n1"]}
    consul.intentions["id-3"] = dict(_managed("egress-ms", "zk-b"), ID="id-3")
    del consul.intentions["id-2"], consul.intentions["id-4"]
    ret = STATES.intentions_managed("intentions", want, wait=0)
    assert ret["changes"] == {"removed": ["egress-10-77-0-11 -> zk-b (remove)"]}
    assert ("DELETE", "/v1/connect/intentions/id-1") in consul.calls


def test_an_instance_on_a_node_outside_the_pillar_keeps_nothing(consul):
    """A node removed from the pillar and never cleaned stays in the catalog until the
    signer forces it out: its identity's allows go at once."""
    consul.intentions = {"id-1": dict(_managed("egress-rt-mp", "zk-b"), ID="id-1")}
    consul.registered["dc-1"] = {"egress-rt-mp": ["n6"]}
    ret = STATES.intentions_managed("intentions", [WANT[0]], wait=0, members=["n1", "n2"])
    assert ret["changes"]["removed"] == ["egress-rt-mp -> zk-b (remove)"]
    consul.intentions = {"id-2": dict(_managed("egress-rt-mp", "zk-b"), ID="id-2")}
    ret = STATES.intentions_managed("intentions", [WANT[0]], wait=0, members=["n1", "n6"])
    assert "removed" not in ret["changes"] and "draining" in ret["comment"]


def test_without_intentions_the_state_computes_them_from_the_pillar(consul, monkeypatch):
    monkeypatch.setattr(STATES, "__salt__", {"apigee_mtls.intentions": lambda: WANT},
                        raising=False)
    ret = STATES.intentions_managed("intentions", wait=0)
    assert ret["result"] is True and len(ret["changes"]["created"]) == 3


# --------------------------------------------------------------------------------------------
# gossip_keyring_managed
def _pools(keys):
    return [{"WAN": wan, "Datacenter": "dc-1", "NumNodes": 5, "Keys": dict(keys)}
            for wan in (False, True)]


def test_a_rotation_failing_midway_keeps_the_changes_of_the_steps_that_ran(consul):
    consul.keyring = _pools({OLD: 5})
    consul.fail[("DELETE", "/v1/operator/keyring")] = 0
    ret = STATES.gossip_keyring_managed("keyring", key=KEY, wait=0)
    assert ret["result"] is False
    assert "step 'remove'" in ret["comment"] and KEY not in ret["comment"]
    assert ret["changes"] == {"installed": STATES._fingerprint(KEY),
                              "primary": STATES._fingerprint(KEY)}


def test_a_rotation_failing_at_once_reports_no_change(consul):
    consul.keyring = _pools({OLD: 5})
    consul.fail[("POST", "/v1/operator/keyring")] = 0
    ret = STATES.gossip_keyring_managed("keyring", key=KEY, wait=0)
    assert (ret["result"], ret["changes"]) == (False, {})


def test_a_full_rotation_reports_every_step(consul):
    consul.keyring = _pools({OLD: 5})
    ret = STATES.gossip_keyring_managed("keyring", key=KEY, wait=0)
    assert ret["result"] is True
    assert ret["changes"] == {"installed": STATES._fingerprint(KEY),
                              "primary": STATES._fingerprint(KEY),
                              "removed": [STATES._fingerprint(OLD)]}


# --------------------------------------------------------------------------------------------
# ACL token states with test=True and the agent down
@pytest.fixture
def acl_node(tmp_path, monkeypatch):
    """n4 with a token file in place, a local agent that does not answer, and its file
    functions: ``(token file, plan, [file.chown calls])``."""
    token = tmp_path / "agent.token"
    token.write_text("00000000-0000-4000-8000-000000000001\n")
    os.chmod(token, 0o600)
    st = os.stat(token)
    chowned = []

    def api(*args, **kwargs):
        raise ConsulError(500, "connect: connection refused")

    utils = {"apigee_mtls_acl.api": api,
             "apigee_mtls_acl.read_token": lambda path: (
                 open(path, encoding="utf-8").read().strip() if os.path.exists(path) else None)}
    plan = amp.plan(load_topology("5-node"), "n4")
    monkeypatch.setattr(STATES, "__utils__", utils, raising=False)
    monkeypatch.setattr(STATES, "__salt__", {
        "apigee_mtls.plan": lambda: dict(plan, member=True), **salt_file_functions(chowned)},
        raising=False)
    monkeypatch.setattr(STATES, "__opts__", {"id": "n4", "test": True}, raising=False)
    monkeypatch.setattr(STATES, "_ids", lambda user, group: (st.st_uid, st.st_gid))
    monkeypatch.setattr(STATES.time, "sleep", lambda seconds: None)
    return token, plan, chowned


def test_token_state_says_it_could_not_check_when_the_agent_is_down(acl_node):
    token, plan, _ = acl_node
    ret = STATES.acl_token_managed(str(token), "/nonexistent/agent-key.pem")
    assert ret["result"] is True and ret["changes"] == {}
    assert "valid" not in ret["comment"]
    assert ret["comment"].startswith(f"ACL token present (policy {plan['acl']['policy']}); "
                                     "could not check it with Consul (agent: HTTP 500")


def test_token_state_takes_signer_and_policy_as_arguments(acl_node):
    token, _, _ = acl_node
    STATES.__salt__["apigee_mtls.plan"] = lambda: pytest.fail("read the pillar")
    token.unlink()
    ret = STATES.acl_token_managed(str(token), "/nonexistent/agent-key.pem", signer="n9",
                                   policy="apigee-mtls-node-n4-0123456789")
    assert ret["result"] is None and ret["comment"] == "Would ask n9 for this node's ACL token"
    assert ret["changes"] == {"tokens": {"agent": {
        "reason": "missing", "policy": "apigee-mtls-node-n4-0123456789"}}}


def test_management_token_state_says_it_could_not_check_when_the_agent_is_down(acl_node):
    token, _, _ = acl_node
    ret = STATES.acl_bootstrapped(str(token))
    assert ret["result"] is True and ret["changes"] == {}
    assert ret["comment"].startswith(f"Could not check the management token in {token}")
    STATES.__opts__["test"] = False
    ret = STATES.acl_bootstrapped(str(token), wait=0)
    assert ret["result"] is False and "cannot check the management token" in ret["comment"]


def test_owner_and_mode_fixes_go_through_salt(acl_node):
    token, _, chowned = acl_node
    os.chmod(token, 0o644)
    STATES.__opts__["test"] = False
    ret = STATES.local_token_managed(str(token), user="consul", group="consul")
    assert ret["result"] is True and ret["comment"] == f"Fixed {token}'s owner and mode"
    assert token.stat().st_mode & 0o777 == 0o600
    assert chowned == [(str(token), "consul", "consul")]
