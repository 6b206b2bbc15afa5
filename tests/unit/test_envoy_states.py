"""The Envoy data plane's states (_states/apigee_mtls_envoy.py, docs/design-envoy.md),
outside Salt's loader: the local agent is scripted (its leaf certificates, roots and trust
domain), files are real (a temporary directory, owned by the user running the tests)."""
import datetime
import importlib.util
import json
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

import apigee_mtls_plan as amp  # registered by conftest.py
from conftest import ROOT, load_salt_module, load_topology

STATES = load_salt_module("_states", "apigee_mtls_envoy_states", "apigee_mtls_envoy.py")
TRUST = "11111111-2222-3333-4444-555555555555.consul"


def _util(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "_utils" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ENVOY, ACL = _util("apigee_mtls_envoy"), _util("apigee_mtls_acl")


def _ca(name):
    """A self-signed CA: ``(key, certificate)``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class Agent:
    """A scripted local agent: a leaf per service (serial ``gen``) issued by the CA
    ``issuer`` (``"old"`` or ``"new"``), the roots (``active`` is the active one's name)."""

    CAS = {name: _ca(f"Consul CA {name}") for name in ("old", "new")}

    def __init__(self):
        self.gen, self.refuse, self.calls = 1, set(), []
        self.issuer = self.active = "old"
        self.leaves, self.cross_signed = {}, False

    def _leaf(self, service):
        """The same certificate for the same service, serial and issuer (a cached leaf)."""
        if (service, self.gen, self.issuer) not in self.leaves:
            self.leaves[service, self.gen, self.issuer] = self._issue(service)
        return self.leaves[service, self.gen, self.issuer]

    def _issue(self, service):
        key, ca = self.CAS[self.issuer]
        cross = ""
        if self.issuer == "new" and self.cross_signed:
            # Consul appends the new root cross-signed by the old one after a root change
            old_key, old = self.CAS["old"]
            cross = _pem(x509.CertificateBuilder().subject_name(ca.subject)
                         .issuer_name(old.subject).public_key(key.public_key())
                         .serial_number(x509.random_serial_number())
                         .not_valid_before(ca.not_valid_before_utc)
                         .not_valid_after(ca.not_valid_after_utc)
                         .sign(old_key, hashes.SHA256()))
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME,
                                                            service)]))
                .issuer_name(ca.subject).public_key(ec.generate_private_key(
                    ec.SECP256R1()).public_key())
                .serial_number(self.gen).not_valid_before(now)
                .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
        return _pem(cert) + cross

    def api(self, method, path, token=None, **_):
        self.calls.append((method, path, token))
        if path.startswith("/v1/agent/connect/ca/leaf/"):
            service = path.rsplit("/", 1)[1]
            if service in self.refuse:
                raise RuntimeError("HTTP 403: Permission denied")
            return {"CertPEM": self._leaf(service),
                    "PrivateKeyPEM": f"-----BEGIN EC PRIVATE KEY-----\nsecret-{service}-"
                                     f"{self.gen}\n-----END EC PRIVATE KEY-----\n"}
        if path == "/v1/agent/connect/ca/roots":
            return {"TrustDomain": TRUST, "Roots": [
                {"RootCert": _pem(ca), "Active": name == self.active}
                for name, (_, ca) in sorted(self.CAS.items())]}
        raise AssertionError(path)


@pytest.fixture
def agent(monkeypatch):
    fake = Agent()
    STATES.__utils__ = {"apigee_mtls_acl.api": fake.api,
                        "apigee_mtls_acl.read_token": lambda path: "node-token",
                        "apigee_mtls_acl.write_secret": ACL.write_secret,
                        "apigee_mtls_envoy.secrets": ENVOY.secrets,
                        "apigee_mtls_envoy.resources": ENVOY.resources,
                        "apigee_mtls_envoy.documents": ENVOY.documents,
                        "apigee_mtls_envoy.bootstrap": ENVOY.bootstrap,
                        "apigee_mtls_plan.plan": amp.plan,
                        "apigee_mtls_plan.intentions": amp.intentions}
    STATES.__opts__ = {"test": False}
    monkeypatch.setattr(STATES, "_ids", lambda user, group: (os.getuid(), os.getgid()))
    return fake


def _certs(path, services=("zk-2181-10-77-0-11",)):
    return STATES.certificates_managed(str(path), list(services), "egress-ms-zk",
                                       token_file="/etc/consul.d/acl/agent.token")


def test_certificates_written_0600_named_not_shown_then_current(agent, tmp_path):
    ret = _certs(tmp_path)
    assert ret["result"] is True, ret
    want = {"zk-2181-10-77-0-11.pem", "zk-2181-10-77-0-11-key.pem", "egress-ms-zk.pem",
            "egress-ms-zk-key.pem", "roots.pem", "zk-2181-10-77-0-11.json",
            "egress-ms-zk.json", "roots.json"}
    assert set(ret["changes"]["written"]) == want
    assert set(os.listdir(tmp_path)) == want
    for name in want:
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name
    assert "secret-" not in json.dumps(ret) and "BEGIN" not in json.dumps(ret)
    assert all(token == "node-token" for _, _, token in agent.calls)
    sds = json.loads((tmp_path / "egress-ms-zk.json").read_text())["resources"][0]
    assert sds["tls_certificate"]["private_key"]["filename"] == str(tmp_path /
                                                                   "egress-ms-zk-key.pem")
    again = _certs(tmp_path)
    assert again["result"] is True and again["changes"] == {}, again


def test_the_directory_is_made_envoys_own_0750_and_a_wrong_mode_is_mended(agent, tmp_path):
    """Envoy runs as the proxy user: a certificates directory it cannot traverse makes it
    reject every listener ("paths must refer to an existing path"), as it did in the lab when
    the directory was created root's."""
    certs = tmp_path / "certs"
    assert _certs(certs)["result"] is True
    st = os.stat(certs)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (os.getuid(), os.getgid(), 0o750)
    os.chmod(certs, 0o700)
    ret = _certs(certs)
    assert ret["changes"] == {"directory": "consul:consul 0750"}, ret
    assert stat.S_IMODE(os.stat(certs).st_mode) == 0o750
    assert _certs(certs)["changes"] == {}


def test_a_renewed_leaf_is_previewed_then_written_alone(agent, tmp_path):
    _certs(tmp_path)
    agent.gen = 2
    STATES.__opts__["test"] = True
    preview = _certs(tmp_path)
    assert preview["result"] is None and preview["comment"].startswith("would"), preview
    assert "secret-zk-2181-10-77-0-11-1" in (tmp_path / "zk-2181-10-77-0-11-key.pem").read_text()
    STATES.__opts__["test"] = False
    ret = _certs(tmp_path)
    assert sorted(ret["changes"]["written"]) == sorted(preview["changes"]["written"]) == [
        "egress-ms-zk-key.pem", "egress-ms-zk.pem", "zk-2181-10-77-0-11-key.pem",
        "zk-2181-10-77-0-11.pem"]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_service_no_longer_planned_loses_its_files_and_others_are_kept(agent, tmp_path):
    _certs(tmp_path, ("zk-2181-10-77-0-11", "zk-2888-10-77-0-11"))
    (tmp_path / "README").write_text("not ours")
    ret = _certs(tmp_path, ("zk-2181-10-77-0-11",))
    assert ret["changes"] == {"removed": ["zk-2888-10-77-0-11-key.pem", "zk-2888-10-77-0-11.json",
                                          "zk-2888-10-77-0-11.pem"]}, ret
    assert (tmp_path / "README").exists()


def test_an_agent_that_refuses_a_leaf_fails_naming_it_and_writes_nothing(agent, tmp_path):
    agent.refuse.add("egress-ms-zk")
    ret = _certs(tmp_path)
    assert ret["result"] is False
    assert "a leaf certificate for egress-ms-zk" in ret["comment"], ret
    assert "Permission denied" in ret["comment"] and not os.listdir(tmp_path)


def test_a_certificate_that_does_not_parse_is_named_as_such_and_writes_nothing(agent, tmp_path,
                                                                            monkeypatch):
    """The agent answered, but with a leaf that is not a certificate: the comment says that,
    not that the agent did not answer (what it said before: "did not give the CA roots")."""
    real = agent.api

    def garbled(method, path, token=None, **kw):
        out = real(method, path, token, **kw)
        if path.endswith("/egress-ms-zk"):
            out = dict(out, CertPEM="-----BEGIN CERTIFICATE-----\nnot base64\n"
                                    "-----END CERTIFICATE-----\n")
        return out

    monkeypatch.setitem(STATES.__utils__, "apigee_mtls_acl.api", garbled)
    ret = _certs(tmp_path)
    assert ret["result"] is False and "do not parse" in ret["comment"], ret
    assert "did not give" not in ret["comment"] and not os.listdir(tmp_path)


def test_a_root_cert_that_does_not_parse_fails_naming_the_key_before_asking_the_agent(
        agent, tmp_path):
    ret = STATES.certificates_managed(str(tmp_path), ["zk-2181-10-77-0-11"], "egress-ms-zk",
                                      root_cert="-----BEGIN CERTIFICATE-----\nAAAA\n"
                                                "-----END CERTIFICATE-----\n")
    assert ret["result"] is False and "connect_ca:root_cert" in ret["comment"], ret
    assert not agent.calls and not os.listdir(tmp_path)


def _n4_certs(tmp_path, pillar):
    plan = amp.plan(pillar, "n4")
    ingress = [s["name"] for s in plan["services"] if s["meta"]["apigee_mtls"] == "ingress"]
    egress = next(s["name"] for s in plan["services"] if s["meta"]["apigee_mtls"] == "egress")
    return STATES.certificates_managed(str(tmp_path / "certs"), ingress, egress)


def test_resources_rendered_from_the_plan_with_the_agents_trust_domain(agent, tmp_path):
    pillar = load_topology("5-node")
    pillar = pillar.get("apigee_mtls", pillar)
    assert _n4_certs(tmp_path, pillar)["result"] is True
    ret = STATES.resources_managed(str(tmp_path), "n4", pillar=pillar)
    assert ret["result"] is True, ret
    assert set(ret["changes"]["written"]) == {"lds.json", "cds.json"}
    plan = amp.plan(pillar, "n4")
    lds = json.loads((tmp_path / "lds.json").read_text())["resources"]
    assert len(lds) == len(plan["services"]) + len(plan["upstreams"])
    assert TRUST in (tmp_path / "cds.json").read_text()
    assert STATES.resources_managed(str(tmp_path), "n4", pillar=pillar)["changes"] == {}
    boot = STATES.bootstrap_managed(str(tmp_path / "bootstrap.json"), "n4", "egress-qpid-pg")
    assert boot["changes"] == {"written": ["bootstrap.json"]}, boot
    doc = json.loads((tmp_path / "bootstrap.json").read_text())
    assert doc["dynamic_resources"]["lds_config"]["path_config_source"]["path"] == str(
        tmp_path / "lds.json")
    # the two states own their own files only: neither removes the other's
    again = STATES.resources_managed(str(tmp_path), "n4", pillar=pillar)
    assert again["changes"] == {} and (tmp_path / "bootstrap.json").exists()
    assert STATES.bootstrap_managed(str(tmp_path / "bootstrap.json"), "n4",
                                    "egress-qpid-pg")["changes"] == {}


def test_resources_of_a_bad_pillar_fail_with_the_planners_error(agent, tmp_path):
    pillar = load_topology("5-node")
    pillar = pillar.get("apigee_mtls", pillar)
    pillar["nodes"][0]["ip"] = "not-an-ip"
    ret = STATES.resources_managed(str(tmp_path), "n4", pillar=pillar)
    assert ret["result"] is False and "nodes" in ret["comment"], ret
    assert not os.listdir(tmp_path)


class NotJoined(Agent):
    """An agent that answers ``error`` until ``joins`` calls have been made."""

    def __init__(self, joins, error="HTTP 500: No known Consul servers"):
        super().__init__()
        self.joins, self.error = joins, error

    def api(self, method, path, token=None, **kw):
        if len(self.calls) < self.joins:
            self.calls.append((method, path, token))
            raise RuntimeError(self.error)
        return super().api(method, path, token, **kw)


def test_a_ca_still_initialising_is_waited_for(agent, tmp_path, monkeypatch):
    """The signer's Connect CA initialises (or switches roots) during the first apply: the
    agent answers "HTTP 500: provider not initialized" for a moment."""
    monkeypatch.setattr(STATES.time, "sleep", lambda s: None)
    busy = NotJoined(joins=3, error="HTTP 500: provider not initialized")
    STATES.__utils__["apigee_mtls_acl.api"] = busy.api
    ret = _certs(tmp_path)
    assert ret["result"] is True and "egress-ms-zk.pem" in ret["changes"]["written"], ret


def test_a_node_not_joined_yet_gets_no_listener_then_all_once_it_joins(agent, tmp_path,
                                                                       monkeypatch):
    """A node just added: its agent has not joined ("No known Consul servers") until its
    peers apply. Its first run waits ``join_wait``, writes no certificate and gives Envoy
    empty listeners and clusters (a listener naming a missing file would be rejected for
    good), without failing; the next run, joined, writes everything."""
    pillar = load_topology("5-node")
    pillar = pillar.get("apigee_mtls", pillar)
    monkeypatch.setattr(STATES.time, "sleep", lambda s: None)
    lonely = NotJoined(joins=10**6)
    STATES.__utils__["apigee_mtls_acl.api"] = lonely.api
    plan = amp.plan(pillar, "n4")
    ingress = [s["name"] for s in plan["services"] if s["meta"]["apigee_mtls"] == "ingress"]
    egress = next(s["name"] for s in plan["services"] if s["meta"]["apigee_mtls"] == "egress")
    certs = STATES.certificates_managed(str(tmp_path / "certs"), ingress, egress, join_wait=0)
    assert certs["result"] is True and certs["changes"] == {}, certs
    assert "has not joined" in certs["comment"] and not (tmp_path / "certs").exists()
    res = STATES.resources_managed(str(tmp_path), "n4", pillar=pillar)
    assert res["result"] is True and set(res["changes"]["written"]) == {"lds.json", "cds.json"}
    for doc in ("lds.json", "cds.json"):
        assert json.loads((tmp_path / doc).read_text()) == {"resources": []}
    # a preview on such a node, or on one whose agent does not run yet, fails nothing
    STATES.__opts__ = {"test": True}
    assert STATES.certificates_managed(str(tmp_path / "certs"), ingress, egress)["result"] is None
    STATES.__opts__ = {"test": False}
    # joined after a few more questions (the peers applied): the next run writes everything
    joining = NotJoined(joins=2)
    STATES.__utils__["apigee_mtls_acl.api"] = joining.api
    certs = STATES.certificates_managed(str(tmp_path / "certs"), ingress, egress)
    assert certs["result"] is True and f"{egress}.json" in certs["changes"]["written"], certs
    res = STATES.resources_managed(str(tmp_path), "n4", pillar=pillar)
    lds = json.loads((tmp_path / "lds.json").read_text())["resources"]
    assert res["result"] is True and len(lds) == len(plan["services"]) + len(plan["upstreams"])


def test_certificates_wait_for_the_organisations_ca_and_leaves_under_the_active_root(
        agent, tmp_path, monkeypatch):
    """The signer switches the mesh root to the organisation's CA during the same run as the
    other nodes write their certificates; the agent re-issues its leaves after a root
    change. Written only once the pillar's root is active and every leaf is under it;
    neither within ``wait`` fails, naming what did not settle."""
    org = _pem(Agent.CAS["new"][1])
    agent.cross_signed = True
    ticks = []

    def sleep(_):
        ticks.append(1)
        if len(ticks) == 2:
            agent.active = "new"       # the signer switched the root
        if len(ticks) == 4:
            agent.issuer = "new"       # the agent re-issued its leaves

    monkeypatch.setattr(STATES.time, "sleep", sleep)
    ret = STATES.certificates_managed(str(tmp_path), ["zk-2181-10-77-0-11"], "egress-ms-zk",
                                      root_cert=org)
    assert ret["result"] is True and len(ticks) == 4, (ret, ticks)
    leaf = x509.load_pem_x509_certificate((tmp_path / "egress-ms-zk.pem").read_bytes())
    assert leaf.issuer == Agent.CAS["new"][1].subject
    # a root that never becomes active fails, naming it
    agent.active = agent.issuer = "old"
    monkeypatch.setattr(STATES.time, "monotonic", iter(range(0, 10**6, 100)).__next__)
    ret = STATES.certificates_managed(str(tmp_path / "b"), ["zk-2181-10-77-0-11"],
                                      "egress-ms-zk", root_cert=org, wait=120)
    assert ret["result"] is False and "connect_ca:root_cert" in ret["comment"], ret
    assert not (tmp_path / "b").exists()
