"""The agent certificate state (``_states/apigee_mtls.py``) without Salt: its pure check
``_cert_problems`` on throwaway CAs, and ``agent_certificate_managed`` driven through a CA
rotation against a fake signer (``apigee_mtls.ask_signer`` replaced by a function call).

A rotation from CA generation 1 to 2 is three applies (README "CA rotation"):
``ca_trust: [2]`` (bundle 1+2, certificates kept), ``ca_generation: 2, ca_trust: [1]``
(certificates re-issued by 2), ``ca_generation: 2`` (bundle 2 only).
"""

import datetime
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import apigee_mtls_plan as amp  # registered by conftest.py
from conftest import load_salt_module, load_topology, salt_file_functions

NOW = datetime.datetime.now(datetime.timezone.utc)
NODE = "n4"
STEP1 = {"ca_trust": [2]}
STEP2 = {"ca_generation": 2, "ca_trust": [1]}
STEP3 = {"ca_generation": 2}


STATES = load_salt_module("_states", "apigee_mtls_states")


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem(obj):
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CA:
    """A throwaway CA of one generation, named as the formula names it."""

    def __init__(self, generation):
        self.generation = generation
        self.key = _key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                             amp.ca_common_name(generation)),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "apigee_mtls")])
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(ski, critical=False)
            .sign(self.key, hashes.SHA256()))
        self.pem = _pem(self.cert)

    def issue(self, public_key, ident, days=365, age=0):
        start = NOW - datetime.timedelta(days=age)
        sans = [x509.DNSName(d) for d in ident["dns_sans"]] + [
            x509.IPAddress(ipaddress.ip_address(i)) for i in ident["ip_sans"]]
        return _pem(
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ident["cn"])]))
            .issuer_name(self.cert.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256()))


def _bundle(*cas):
    return b"".join(ca.pem for ca in cas)


def _plan(tls=None, node=NODE):
    pillar = load_topology("5-node")
    if tls is not None:
        pillar["tls"] = tls
    return dict(amp.plan(pillar, node), member=True)


@pytest.fixture(scope="module")
def cas():
    return {1: CA(1), 2: CA(2)}


@pytest.fixture(scope="module")
def agent_key():
    return _key()


def _problems(cert, key, bundle, tls=None, now=None):
    plan = _plan(tls)
    return STATES._cert_problems(cert, key, bundle, plan["certificate"],
                                 plan["tls"]["cert_days_remaining"], plan["ca_generations"],
                                 now=now)


# ---------------------------------------------------------------------------------------------
# _cert_problems

def test_valid_certificate_and_bundle_have_no_problems(cas, agent_key):
    cert = cas[1].issue(agent_key.public_key(), _plan()["certificate"])
    assert _problems(cert, _pem(agent_key), _bundle(cas[1])) == {
        "certificate": [], "ca_bundle": []}


def test_missing_files(cas, agent_key):
    assert _problems(None, _pem(agent_key), _bundle(cas[1])) == {
        "certificate": ["certificate missing"], "ca_bundle": []}
    cert = cas[1].issue(agent_key.public_key(), _plan()["certificate"])
    assert _problems(cert, _pem(agent_key), None) == {
        "certificate": ["not issued by a CA in the trusted bundle"],
        "ca_bundle": ["CA bundle missing"]}
    assert _problems(cert, None, _bundle(cas[1]))["certificate"] == ["private key missing"]


def test_unreadable_files(cas, agent_key):
    cert = cas[1].issue(agent_key.public_key(), _plan()["certificate"])
    found = _problems(cert, _pem(agent_key), b"garbage")
    assert found["ca_bundle"][0].startswith("CA bundle unreadable")
    found = _problems(b"garbage", _pem(agent_key), _bundle(cas[1]))
    assert found["certificate"][0].startswith("unreadable")


def test_renewal_reasons_kept(cas, agent_key):
    ident = _plan()["certificate"]
    other = _key()
    wrong_key = cas[1].issue(other.public_key(), ident)
    assert _problems(wrong_key, _pem(agent_key), _bundle(cas[1]))["certificate"] == [
        "certificate does not match the private key"]
    wrong_sans = cas[1].issue(agent_key.public_key(), dict(ident, dns_sans=["localhost"]))
    assert _problems(wrong_sans, _pem(agent_key), _bundle(cas[1]))["certificate"] == [
        "SANs differ from the topology"]
    old = cas[1].issue(agent_key.public_key(), ident, days=365, age=340)
    assert _problems(old, _pem(agent_key), _bundle(cas[1]))["certificate"] == [
        "expires in 24 days (renew below 30)"]
    later = NOW + datetime.timedelta(days=400)
    fresh = cas[1].issue(agent_key.public_key(), ident)
    assert _problems(fresh, _pem(agent_key), _bundle(cas[1]), now=later)["certificate"][
        0].startswith("expires in -3")  # expired 35 days ago


def test_rotation_step1_needs_the_bundle_only(cas, agent_key):
    cert = cas[1].issue(agent_key.public_key(), _plan()["certificate"])
    found = _problems(cert, _pem(agent_key), _bundle(cas[1]), STEP1)
    assert found == {"certificate": [], "ca_bundle": [
        "CA bundle holds ['apigee_mtls cluster CA']; expected ['apigee_mtls cluster CA', "
        "'apigee_mtls cluster CA generation 2']"]}
    assert _problems(cert, _pem(agent_key), _bundle(cas[1], cas[2]), STEP1) == {
        "certificate": [], "ca_bundle": []}


def test_rotation_step2_needs_a_certificate_from_the_new_ca(cas, agent_key):
    ident = _plan()["certificate"]
    cert = cas[1].issue(agent_key.public_key(), ident)
    found = _problems(cert, _pem(agent_key), _bundle(cas[1], cas[2]), STEP2)
    assert found["certificate"] == [
        "issued by 'apigee_mtls cluster CA', not by the signing CA "
        "'apigee_mtls cluster CA generation 2' (tls:ca_generation)"]
    assert found["ca_bundle"]  # the signing generation comes first
    new = cas[2].issue(agent_key.public_key(), ident)
    assert _problems(new, _pem(agent_key), _bundle(cas[2], cas[1]), STEP2) == {
        "certificate": [], "ca_bundle": []}


def test_rotation_step3_drops_the_old_ca_from_the_bundle(cas, agent_key):
    cert = cas[2].issue(agent_key.public_key(), _plan()["certificate"])
    found = _problems(cert, _pem(agent_key), _bundle(cas[2], cas[1]), STEP3)
    assert found["certificate"] == [] and len(found["ca_bundle"]) == 1
    assert _problems(cert, _pem(agent_key), _bundle(cas[2]), STEP3) == {
        "certificate": [], "ca_bundle": []}


def test_a_node_that_missed_steps_gets_a_new_certificate(cas, agent_key):
    """Offline during steps 1 and 2: at step 3 it holds a generation-1 certificate and
    bundle; it needs both (its certificate is not even verifiable with its bundle)."""
    cert = cas[1].issue(agent_key.public_key(), _plan()["certificate"])
    found = _problems(cert, _pem(agent_key), _bundle(cas[1]), STEP3)
    assert found["certificate"] == [
        "issued by 'apigee_mtls cluster CA', not by the signing CA "
        "'apigee_mtls cluster CA generation 2' (tls:ca_generation)"]
    assert found["ca_bundle"]


def test_same_name_other_key_is_not_the_issuer(cas, agent_key):
    impostor = CA(2)  # a generation-2 CA with another key (e.g. recreated)
    cert = impostor.issue(agent_key.public_key(), _plan()["certificate"])
    found = _problems(cert, _pem(agent_key), _bundle(cas[2]), STEP3)
    assert found == {"certificate": ["not issued by a CA in the trusted bundle"],
                     "ca_bundle": []}


# ---------------------------------------------------------------------------------------------
# agent_certificate_managed through a rotation, against a fake signer

class Signer:
    """What ``apigee_mtls.sign_agent_certificate`` answers, from the signer's own pillar."""

    def __init__(self, cas, tls=None):
        self.cas = cas
        self.tls = tls
        self.calls = []
        self.not_ready = 0  # answers "retry" this many times first

    def __call__(self, public_key, bundle_only=False):
        self.calls.append("bundle" if bundle_only else "sign")
        if self.not_ready:
            self.not_ready -= 1
            return {"error": "CA not ready yet on the signer (generation 2)", "retry": True}
        plan = _plan(self.tls)
        gens = [g["generation"] for g in plan["ca_generations"]]
        answer = {"ca_bundle": _bundle(*(self.cas[g] for g in gens)).decode(),
                  "generation": gens[0], "generations": gens}
        if not bundle_only:
            pub = serialization.load_pem_public_key(public_key.encode())
            answer["certificate"] = self.cas[gens[0]].issue(pub, plan["certificate"]).decode()
        return answer


@pytest.fixture
def node(tmp_path, agent_key, monkeypatch):
    """The state module with a fake Salt around it, for node n4, and its TLS directory."""
    env = {"tls": None, "signer": None, "test": False, "chowned": [], "args": {}, "views": []}
    key_path = tmp_path / "agent-key.pem"
    key_path.write_bytes(_pem(agent_key))
    pub = agent_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def ask_signer(fun, signer=None, public_key=None, bundle_only=False, view=None):
        assert (signer, fun) == ("n1", "sign_agent_certificate")
        # the node's view of the pillar goes with every request (the signer refreshes its
        # own pillar when it differs)
        env["views"].append(view)
        return env["signer"](public_key, bundle_only=bundle_only)

    monkeypatch.setattr(STATES, "__salt__", {
        "apigee_mtls.plan": lambda: _plan(env["tls"]),
        "x509.get_public_key": lambda path: pub,
        "apigee_mtls.ask_signer": ask_signer,
        "pillar.get": lambda key, default=None, unmask=False: {"tls": env["tls"]},
        **salt_file_functions(env["chowned"]),
    }, raising=False)
    monkeypatch.setattr(STATES, "__utils__", {
        "apigee_mtls_plan.pillar_fingerprint": amp.pillar_fingerprint}, raising=False)
    monkeypatch.setattr(STATES, "__opts__", {"id": NODE, "test": False}, raising=False)
    monkeypatch.setattr(STATES.time, "sleep", lambda seconds: None)

    def apply(tls, signer, test=False, wait=180):
        env["tls"], env["signer"] = tls, signer
        STATES.__opts__["test"] = test
        return STATES.agent_certificate_managed(
            str(tmp_path / "agent.pem"), str(key_path), str(tmp_path / "ca.pem"),
            group="root", wait=wait, **env["args"])

    def files():
        return {name: (tmp_path / name).read_bytes() if (tmp_path / name).exists() else None
                for name in ("agent.pem", "ca.pem")}

    apply.env = env
    return apply, files


def _issuer(pem):
    cert = x509.load_pem_x509_certificate(pem)
    return cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def _bundle_names(pem):
    return [c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            for c in x509.load_pem_x509_certificates(pem)]


G1, G2 = amp.ca_common_name(1), amp.ca_common_name(2)


def test_staged_rotation_end_to_end(node, cas):
    apply, files = node
    # first rollout, generation 1
    signer = Signer(cas)
    ret = apply(None, signer)
    assert ret["result"] is True and set(ret["changes"]) == {"certificate", "ca_bundle"}
    first = files()
    assert _issuer(first["agent.pem"]) == G1 and _bundle_names(first["ca.pem"]) == [G1]
    assert apply(None, signer)["changes"] == {}

    # 1. ca_trust: [2]: preview, then the bundle alone, the certificate kept
    signer = Signer(cas, STEP1)
    ret = apply(STEP1, signer, test=True)
    assert ret["result"] is None and set(ret["changes"]) == {"ca_bundle"}
    assert ret["comment"] == "Would fetch the CA bundle (generations 1, 2) from n1"
    assert files() == first and signer.calls == []
    ret = apply(STEP1, signer)
    assert ret["result"] is True and set(ret["changes"]) == {"ca_bundle"}, ret
    assert ret["changes"]["ca_bundle"]["generations"] == [1, 2]
    assert signer.calls == ["bundle"]
    step1 = files()
    assert step1["agent.pem"] == first["agent.pem"]
    assert _bundle_names(step1["ca.pem"]) == [G1, G2]
    assert apply(STEP1, signer)["changes"] == {}

    # 2. ca_generation: 2, ca_trust: [1]: a certificate from generation 2
    signer = Signer(cas, STEP2)
    ret = apply(STEP2, signer, test=True)
    assert ret["result"] is None and set(ret["changes"]) == {"certificate", "ca_bundle"}
    assert ret["comment"] == (
        "Would request a new agent certificate (CA generation 2) from n1")
    assert files() == step1
    ret = apply(STEP2, signer)
    assert ret["result"] is True and ret["changes"]["certificate"]["ca_generation"] == 2
    step2 = files()
    assert _issuer(step2["agent.pem"]) == G2 and _bundle_names(step2["ca.pem"]) == [G2, G1]
    assert apply(STEP2, signer)["changes"] == {}

    # 3. ca_generation: 2: generation 1 no longer trusted
    signer = Signer(cas, STEP3)
    ret = apply(STEP3, signer)
    assert set(ret["changes"]) == {"ca_bundle"} and signer.calls == ["bundle"]
    step3 = files()
    assert step3["agent.pem"] == step2["agent.pem"] and _bundle_names(step3["ca.pem"]) == [G2]
    assert apply(STEP3, signer)["changes"] == {} and signer.calls == ["bundle"]


def test_signer_with_an_older_pillar_is_refused_nothing_written(node, cas):
    apply, files = node
    apply(None, Signer(cas))
    before = files()
    lagging = Signer(cas)  # the signer has not seen ca_trust: [2] yet
    ret = apply(STEP1, lagging, wait=0)
    assert ret["result"] is False and ret["changes"] == {}
    assert "does not match this node's pillar" in ret["comment"]
    assert G2 in ret["comment"]
    assert files() == before


def test_waits_while_the_new_ca_is_not_created_yet(node, cas):
    apply, files = node
    apply(None, Signer(cas))
    signer = Signer(cas, STEP1)
    signer.not_ready = 2
    ret = apply(STEP1, signer)
    assert ret["result"] is True and signer.calls == ["bundle"] * 3
    assert _bundle_names(files()["ca.pem"]) == [G1, G2]
    late = Signer(cas, STEP2)
    late.not_ready = 99
    ret = apply(STEP2, late, wait=0)
    assert ret["result"] is False
    assert ret["comment"] == ("signer n1 did not sign: CA not ready yet on the signer "
                              "(generation 2)")


def test_bundle_that_does_not_vouch_for_the_certificate_brings_a_new_one(node, cas, tmp_path):
    """The node's generation-1 CA is not the signer's (e.g. the CA was recreated): fetching
    the bundle alone is not enough, the state asks for a certificate too."""
    apply, files = node
    apply(None, Signer({1: CA(1), 2: cas[2]}))  # issued by another generation-1 CA
    signer = Signer(cas, STEP1)
    ret = apply(STEP1, signer)
    assert ret["result"] is True and signer.calls == ["bundle", "sign"]
    assert set(ret["changes"]) == {"certificate", "ca_bundle"}
    assert ret["changes"]["certificate"]["reason"] == [
        "not issued by a CA in the trusted bundle"]
    assert STATES._cert_problems(
        files()["agent.pem"], (tmp_path / "agent-key.pem").read_bytes(), files()["ca.pem"],
        _plan(STEP1)["certificate"], 30, _plan(STEP1)["ca_generations"]) == {
            "certificate": [], "ca_bundle": []}


def test_files_get_the_owner_and_mode_of_the_arguments(node, cas, tmp_path):
    apply, files = node
    apply.env["args"] = {"mode": "0640", "user": "consul"}
    ret = apply(None, Signer(cas))
    assert ret["result"] is True and set(ret["changes"]) == {"certificate", "ca_bundle"}
    for name in ("agent.pem", "ca.pem"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640
        assert not (tmp_path / (name + ".tmp")).exists()
    assert sorted(apply.env["chowned"]) == [
        (str(tmp_path / "agent.pem.tmp"), "consul", "root"),
        (str(tmp_path / "ca.pem.tmp"), "consul", "root")]
    # written exactly as the signer sent them: the next run has nothing to do
    assert files()["ca.pem"] == cas[1].pem
    assert apply(None, Signer(cas))["changes"] == {}


def test_arguments_replace_the_pillar(node, cas):
    """The SLS passes the plan's identity, CA generations and signer; a state given them
    does not read the pillar (here: a plan that would fail)."""
    apply, files = node
    plan = _plan()
    STATES.__salt__["apigee_mtls.plan"] = lambda: pytest.fail("read the pillar")
    apply.env["args"] = {"signer": "n1", "identity": plan["certificate"],
                         "ca_generations": plan["ca_generations"],
                         "days_remaining": plan["tls"]["cert_days_remaining"]}
    ret = apply(None, Signer(cas))
    assert ret["result"] is True and "certificate" in ret["changes"]
    assert _issuer(files()["agent.pem"]) == amp.ca_common_name(1)


def test_a_bad_pillar_fails_the_state_with_the_module_error(node, cas):
    apply, files = node

    def bad_plan():
        raise STATES.CommandExecutionError("apigee_mtls: invalid pillar: apigee_mtls:nodes: x")

    STATES.__salt__["apigee_mtls.plan"] = bad_plan
    ret = apply(None, Signer(cas))
    assert (ret["result"], ret["changes"]) == (False, {})
    assert ret["comment"] == "apigee_mtls: invalid pillar: apigee_mtls:nodes: x"
    assert files() == {"agent.pem": None, "ca.pem": None}
