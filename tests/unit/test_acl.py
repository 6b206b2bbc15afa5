"""Consul ACLs without Consul: what each node's policy allows (planner), how tokens are
sealed to one node's key (util), and what the signer does for a token request (module),
against a fake Consul ACL API that keeps policies and tokens in memory."""

import copy
import importlib.util
import logging
import pathlib
import re

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import apigee_mtls_plan as amp  # registered by conftest.py
from conftest import load_salt_module, load_topology

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("apigee_mtls_acl", ROOT / "_utils" /
                                               "apigee_mtls_acl.py")
acl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(acl)

MODULE = load_salt_module("_modules", "apigee_mtls_module_acl")
QUIET = logging.getLogger("apigee_mtls_module_acl.test")
QUIET.propagate = False
QUIET.addHandler(logging.NullHandler())


def _ec_pair():
    key = ec.generate_private_key(ec.SECP256R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return priv, pub


# --------------------------------------------------------------------------------------------
# planner: policies
def test_node_rules_grant_write_on_own_services_only():
    pillar = load_topology("5-node")
    plan = amp.plan(pillar, "n4")
    rules = plan["acl"]["rules"]
    own = {s["name"] for s in plan["services"]} | {amp.egress_name(plan["node"]["ip"])}
    written = set(re.findall(r'service "([^"]+)" \{ policy = "write"', rules))
    assert written == own | {n + "-sidecar-proxy" for n in own}
    others = {s["name"] for n in ("n1", "n2", "n5") for s in amp.plan(pillar, n)["services"]}
    # n5 has n4's role (qpid + postgres): the one name they share is that identity
    assert written & others == {plan["egress"]["identity"]}
    # the catalog is readable (upstream discovery), intentions only of its own services
    assert 'service_prefix "" { policy = "read" intentions = "deny" }' in rules
    assert 'node "n4" { policy = "write" }' in rules and 'agent "n4" { policy = "write" }' in rules
    # a client reads the servers' binary records (it restarts onto a new binary after them)
    # and the restart lock, and writes only its own restart key, under a session of its own
    assert 'key_prefix "apigee_mtls/binary/" { policy = "read" }' in rules
    assert 'key_prefix "apigee_mtls/restart/" { policy = "read" }' in rules
    assert re.findall(r'key(?:_prefix)? "([^"]*)" \{ policy = "write"', rules) == [
        "apigee_mtls/restart/clients/n4"]
    assert re.findall(r'session(?:_prefix)? "([^"]*)"', rules) == ["n4"]
    for power in ('key_prefix "" ', "keyring", "operator", "acl ", "session_prefix",
                  "node_prefix \"\" { policy = \"write"):
        assert power not in rules
    assert rules.count("key_prefix") == 2


def test_server_rules_add_only_what_restart_coordination_needs():
    """Beyond a client's rights (a session on its own node included), a server may write the
    formula's KV prefix (the restart lock and binary records); nothing more: no operator
    right (it would read the Connect CA configuration, the organisation CA key included)."""
    pillar = load_topology("5-node")
    client = amp.plan(pillar, "n4")["acl"]["rules"]
    server = amp.plan(pillar, "n2")["acl"]["rules"]
    extra = set(server.splitlines()) - set(client.splitlines())
    extra = {line for line in extra
             if not line.startswith(("service ", "node \"", "agent \"", "session \"n2\""))}
    assert extra == {'key_prefix "apigee_mtls/" { policy = "write" }'}, extra
    assert "session_prefix" not in server and "keyring" not in server
    assert "operator" not in server


def test_policy_name_follows_the_rules():
    pillar = load_topology("5-node")
    before = amp.plan(pillar, "n2")["acl"]["policy"]
    assert before == amp.plan(copy.deepcopy(pillar), "n2")["acl"]["policy"]  # stable
    assert re.fullmatch(r"apigee-mtls-node-n2-[0-9a-f]{10}", before)
    pillar["cassandra_internode"] = False  # n2 loses its cass-7000 service
    after = amp.plan(pillar, "n2")["acl"]["policy"]
    assert after != before and after.startswith("apigee-mtls-node-n2-")
    assert amp.plan(pillar, "n4")["acl"]["policy"] == amp.plan(load_topology("5-node"), "n4")[
        "acl"]["policy"]  # n4 has no cassandra: unchanged


def test_accessors_are_fixed_and_distinct():
    ids = {amp.acl_accessor(f"node-n{i}") for i in range(1, 50)} | {amp.acl_accessor("replication")}
    assert len(ids) == 50
    assert amp.acl_accessor("node-n1") == amp.acl_accessor("node-n1")


def test_consul_config_turns_acls_on_with_default_deny_and_no_token():
    plan = amp.plan(load_topology("5-node"), "n1")
    assert plan["consul_config"]["acl"] == {"enabled": True, "default_policy": "deny",
                                            "down_policy": "extend-cache",
                                            "enable_token_persistence": False}
    assert "tokens" not in plan["consul_config"]["acl"]  # tokens only in files on the node
    assert plan["acl"]["replication_token_file"] is None


def test_secondary_dc_servers_get_a_replication_token_and_clients_do_not():
    pillar = load_topology("12-node-2dc")
    model = amp.normalize(pillar)
    dc2 = [n for n in model["nodes"] if n["datacenter"] == "dc-2"]
    for node in dc2:
        plan = amp.plan(pillar, node["id"])
        assert plan["acl"]["replication"] == plan["is_server"], node["id"]
    assert model["tls"]["signer"] in [n["id"] for n in model["nodes"]
                                      if n["datacenter"] == "dc-1"]


def test_default_signer_is_in_the_primary_dc_even_if_listed_later():
    pillar = load_topology("12-node-2dc")
    dc1 = [n for n in pillar["nodes"] if n.get("datacenter", "dc-1") == "dc-1"]
    dc2 = [n for n in pillar["nodes"] if n.get("datacenter") == "dc-2"]
    pillar["nodes"] = dc2 + dc1
    model = amp.normalize(pillar)
    signer = next(n for n in model["nodes"] if n["id"] == model["tls"]["signer"])
    assert signer["datacenter"] == "dc-1" and "zookeeper" in signer["components"]


def test_acl_disabled_leaves_consul_open_and_plans_no_token():
    pillar = load_topology("5-node")
    pillar["acl"] = {"enabled": False}
    plan = amp.plan(pillar, "n2")
    assert "acl" not in plan["consul_config"] and plan["acl"] == {"enabled": False}


# --------------------------------------------------------------------------------------------
# util: sealing
def test_a_sealed_token_opens_with_the_node_key_only():
    priv, pub = _ec_pair()
    other, _ = _ec_pair()
    box = acl.seal(pub, "5ec5ec00-0000-4000-8000-000000000002")
    assert "5ec5ec00" not in repr(box)
    assert acl.unseal(priv, box) == "5ec5ec00-0000-4000-8000-000000000002"
    with pytest.raises(ValueError):
        acl.unseal(other, box)
    tampered = dict(box, ct=box["ct"][:-4] + ("AAAA" if box["ct"][-4:] != "AAAA" else "BBBB"))
    with pytest.raises(ValueError):
        acl.unseal(priv, tampered)
    assert acl.seal(pub, "x") != acl.seal(pub, "x")  # a fresh ephemeral key every time


def test_seal_refuses_a_non_ec_key():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ValueError):
        acl.seal(pub, "token")


def test_write_secret_creates_the_file_with_its_mode(tmp_path):
    import os  # pylint: disable=import-outside-toplevel

    path = tmp_path / "agent.token"
    acl.write_secret(str(path), "t0ken", os.getuid(), os.getgid(), 0o600)
    assert path.read_text() == "t0ken" and (path.stat().st_mode & 0o777) == 0o600
    assert acl.read_token(str(path)) == "t0ken"
    assert acl.read_token(str(tmp_path / "missing")) is None


# --------------------------------------------------------------------------------------------
# module: the signer's answer to a token request
class FakeConsul:
    """The ACL endpoints the signer uses, in memory; only the management token passes."""

    def __init__(self, mgmt):
        self.mgmt, self.policies, self.tokens, self.calls = mgmt, {}, {}, []
        self.n = 0

    def __call__(self, method, path, token=None, body=None, port=8500, timeout=10):
        self.calls.append((method, path))
        if token != self.mgmt:
            raise acl.ConsulError(403, "Permission denied")
        if (method, path) == ("GET", "/v1/acl/policies"):
            return list(self.policies.values())
        if (method, path) == ("PUT", "/v1/acl/policy"):
            self.n += 1
            pol = dict(body, ID=f"pol-{self.n}")
            self.policies[pol["ID"]] = pol
            return pol
        if method == "DELETE" and path.startswith("/v1/acl/policy/"):
            del self.policies[path.rsplit("/", 1)[1]]
            return True
        if path.startswith("/v1/acl/token/"):
            accessor = path.rsplit("/", 1)[1]
            if method == "GET":
                if accessor not in self.tokens:
                    raise acl.ConsulError(403, "ACL not found")
                return self.tokens[accessor]
            self.tokens[accessor] = dict(body)
            return self.tokens[accessor]
        if (method, path) == ("PUT", "/v1/acl/token"):
            self.n += 1
            tok = dict(body, SecretID=f"00000000-0000-4000-8000-{self.n:012d}")
            self.tokens[body["AccessorID"]] = tok
            return tok
        raise AssertionError((method, path))


@pytest.fixture
def signer(tmp_path, monkeypatch):
    pillar = load_topology("12-node-2dc")
    pillar.setdefault("consul", {})["config_dir"] = str(tmp_path)
    (tmp_path / "acl").mkdir()
    fake = FakeConsul("mgmt-token")
    utils = {"apigee_mtls_plan." + name: getattr(amp, name)
             for name in ("normalize", "plan", "acl_accessor", "replication_rules")}
    utils.update({"apigee_mtls_acl." + name: getattr(acl, name)
                  for name in ("read_token", "seal")})
    utils["apigee_mtls_acl.api"] = fake
    monkeypatch.setattr(MODULE, "__utils__", utils, raising=False)
    monkeypatch.setattr(MODULE, "__salt__", {
        "pillar.get": lambda key, default=None, unmask=False: pillar}, raising=False)
    monkeypatch.setattr(MODULE, "__opts__", {"id": "n1"}, raising=False)
    monkeypatch.setattr(MODULE, "log", QUIET)
    return pillar, fake, tmp_path / "acl" / "management.token"


def test_no_token_before_the_bootstrap(signer):
    _, _, mgmt = signer
    _, pub = _ec_pair()
    assert MODULE.issue_acl_token(pub, __pub_id="n2") == {
        "error": "ACLs are not bootstrapped yet on the signer", "retry": True}
    mgmt.write_text("mgmt-token")
    assert "agent" in MODULE.issue_acl_token(pub, __pub_id="n2")


def test_the_token_is_the_requesters_own_and_sealed_to_its_key(signer):
    pillar, fake, mgmt = signer
    mgmt.write_text("mgmt-token\n")
    priv, pub = _ec_pair()
    answer = MODULE.issue_acl_token(pub, __pub_id="n2")
    want = amp.plan(pillar, "n2")["acl"]
    assert answer["policy"] == want["policy"] and "replication" not in answer
    secret = acl.unseal(priv, answer["agent"])
    token = fake.tokens[amp.acl_accessor("node-n2")]
    assert token["SecretID"] == secret and token["Policies"] == [{"Name": want["policy"]}]
    assert secret not in repr(answer)
    # asked again: the same token (not a new one per run)
    again = MODULE.issue_acl_token(pub, __pub_id="n2")
    assert acl.unseal(priv, again["agent"]) == secret and len(fake.tokens) == 1
    # the identity is the master's __pub_id: an argument cannot choose another node
    other = MODULE.issue_acl_token(pub, __pub_id="n3", id="n2")
    assert acl.unseal(priv, other["agent"]) != secret


def test_a_secondary_dc_server_also_gets_the_replication_token(signer):
    pillar, fake, mgmt = signer
    mgmt.write_text("mgmt-token")
    priv, pub = _ec_pair()
    server = next(n["id"] for n in amp.normalize(pillar)["nodes"]
                  if n["datacenter"] == "dc-2" and "zookeeper" in n["components"])
    answer = MODULE.issue_acl_token(pub, __pub_id=server)
    rep = fake.tokens[amp.acl_accessor("replication")]
    assert acl.unseal(priv, answer["replication"]) == rep["SecretID"]


def test_a_changed_policy_relinks_the_token_and_deletes_the_stale_policy(signer):
    pillar, fake, mgmt = signer
    mgmt.write_text("mgmt-token")
    priv, pub = _ec_pair()
    first = acl.unseal(priv, MODULE.issue_acl_token(pub, __pub_id="n2")["agent"])
    old = amp.plan(pillar, "n2")["acl"]["policy"]
    pillar["cassandra_internode"] = False
    new = amp.plan(pillar, "n2")["acl"]["policy"]
    answer = MODULE.issue_acl_token(pub, __pub_id="n2")
    assert answer["policy"] == new != old
    assert acl.unseal(priv, answer["agent"]) == first  # same secret, new rules
    names = {p["Name"] for p in fake.policies.values()}
    assert new in names and old not in names


def test_strangers_and_retired_nodes_get_no_token(signer):
    pillar, _, mgmt = signer
    mgmt.write_text("mgmt-token")
    _, pub = _ec_pair()
    assert "not an active node" in MODULE.issue_acl_token(pub, __pub_id="intruder")["error"]
    pillar["nodes"][-1]["retired"] = True
    rid = pillar["nodes"][-1]["id"]
    assert "not an active node" in MODULE.issue_acl_token(pub, __pub_id=rid)["error"]
    pillar["acl"] = {"enabled": False}
    assert MODULE.issue_acl_token(pub, __pub_id="n2")["error"].startswith("ACLs are disabled")
