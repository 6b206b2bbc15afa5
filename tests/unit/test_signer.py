"""The signer's side of agent TLS (``_modules/apigee_mtls.py``) without Salt: which CA
generation signs, which ones the bundle holds, what a requester can and cannot choose, and
which CA files the formula finds on the signer. Salt's x509 module is replaced by a recorder.
"""

import logging

import pytest

import apigee_mtls_plan as amp  # registered by conftest.py
from conftest import load_salt_module, load_topology


MODULE = load_salt_module("_modules", "apigee_mtls_module")
# Salt's deferred log handler would print the module's warnings after pytest closed stderr
QUIET = logging.getLogger("apigee_mtls_module.test")
QUIET.propagate = False
QUIET.addHandler(logging.NullHandler())
PUB = "-----BEGIN PUBLIC KEY-----\nrequester\n-----END PUBLIC KEY-----\n"
FRESH = {}  # "pillar": what the master compiles fresh (pillar.items)


@pytest.fixture
def signer(tmp_path, monkeypatch):
    """``(set_tls, make_ca, signed)``: the module as minion n1 (the signer) with its CA
    directory in tmp_path; ``signed`` records the x509.create_certificate calls."""
    pillar = load_topology("5-node")
    signed = []

    def create_certificate(**kwargs):
        signed.append(kwargs)
        return "CERT for " + kwargs["CN"]

    monkeypatch.setattr(MODULE, "CA_DIR", str(tmp_path))
    monkeypatch.setattr(MODULE, "log", QUIET)
    monkeypatch.setattr(MODULE, "__utils__", {
        "apigee_mtls_plan." + name: getattr(amp, name)
        for name in ("normalize", "plan", "ca_file_names", "ca_file_generation",
                     "pillar_fingerprint")},
        raising=False)
    monkeypatch.setattr(MODULE, "__salt__", {
        "pillar.get": lambda key, default=None, unmask=False: pillar,
        # the master's fresh pillar (pillar.items compiles it): set by a test as "fresh"
        "pillar.items": lambda unmask=False: {"apigee_mtls": FRESH.get("pillar")},
        "x509.create_certificate": create_certificate}, raising=False)
    FRESH.clear()
    monkeypatch.setattr(MODULE, "__opts__", {"id": "n1"}, raising=False)

    def set_tls(tls):
        pillar["tls"] = tls

    def make_ca(generation):
        names = amp.ca_file_names(generation)
        (tmp_path / names["key"]).write_text(f"KEY {generation}\n")
        (tmp_path / names["cert"]).write_text(f"CA {generation}")  # no final newline

    return set_tls, make_ca, signed


def test_first_ca_signs_by_default(signer):
    _, make_ca, signed = signer
    make_ca(1)
    answer = MODULE.sign_agent_certificate(PUB, __pub_id="n4")
    assert answer == {"certificate": "CERT for n4", "ca_bundle": "CA 1\n", "generation": 1,
                      "generations": [1]}
    assert signed[0]["signing_private_key"].endswith("/ca-key.pem")
    assert signed[0]["signing_cert"].endswith("/ca.pem")
    assert signed[0]["public_key"] == PUB


@pytest.mark.parametrize("tls, signing, bundle", [
    ({"ca_trust": [2]}, 1, "CA 1\nCA 2\n"),
    ({"ca_generation": 2, "ca_trust": [1]}, 2, "CA 2\nCA 1\n"),
    ({"ca_generation": 2}, 2, "CA 2\n"),
    ({"ca_generation": 3, "ca_trust": [2, 1]}, 3, "CA 3\nCA 1\nCA 2\n"),
])
def test_rotation_signs_with_the_pillar_generation(signer, tls, signing, bundle):
    set_tls, make_ca, signed = signer
    for gen in (1, 2, 3):
        make_ca(gen)
    set_tls(tls)
    answer = MODULE.sign_agent_certificate(PUB, __pub_id="n4")
    assert (answer["generation"], answer["ca_bundle"]) == (signing, bundle)
    assert signed[0]["signing_private_key"].endswith("/" + amp.ca_file_names(signing)["key"])
    assert signed[0]["signing_cert"].endswith("/" + amp.ca_file_names(signing)["cert"])


def test_bundle_only_signs_nothing(signer):
    set_tls, make_ca, signed = signer
    make_ca(1)
    make_ca(2)
    set_tls({"ca_trust": [2]})
    answer = MODULE.sign_agent_certificate(PUB, bundle_only=True, __pub_id="n4")
    assert answer == {"ca_bundle": "CA 1\nCA 2\n", "generation": 1, "generations": [1, 2]}
    assert signed == []


def test_requester_cannot_choose_the_generation_or_identity(signer):
    set_tls, make_ca, signed = signer
    make_ca(1)
    make_ca(2)
    set_tls({"ca_trust": [2]})
    answer = MODULE.sign_agent_certificate(PUB, __pub_id="n4", ca_generation=2, CN="n1",
                                           generation=2)
    assert answer["generation"] == 1 and signed[0]["CN"] == "n4"
    assert signed[0]["signing_private_key"].endswith("/ca-key.pem")


def test_a_trusted_generation_not_created_yet_means_retry(signer):
    set_tls, make_ca, signed = signer
    make_ca(1)
    set_tls({"ca_trust": [2]})
    for bundle_only in (False, True):
        answer = MODULE.sign_agent_certificate(PUB, bundle_only=bundle_only, __pub_id="n4")
        assert answer == {"error": "CA not ready yet on the signer (generation 2)",
                          "retry": True}
    assert signed == []
    assert MODULE.ca_ready() is False and MODULE.ca_ready([1]) is True
    make_ca(2)
    assert MODULE.ca_ready() is True
    assert MODULE.sign_agent_certificate(PUB, __pub_id="n4")["ca_bundle"] == "CA 1\nCA 2\n"


def test_refusals(signer, monkeypatch):
    _, make_ca, _ = signer
    make_ca(1)
    assert "not an active node" in MODULE.sign_agent_certificate(PUB, __pub_id="x9")["error"]
    assert MODULE.sign_agent_certificate(None, __pub_id="n4") == {
        "error": "no public key to sign"}
    monkeypatch.setitem(MODULE.__opts__, "id", "n2")
    assert MODULE.sign_agent_certificate(PUB, __pub_id="n4") == {
        "error": "n2 is not the signer (n1)"}


def test_ca_files_lists_generations_on_disk(signer, tmp_path):
    _, make_ca, _ = signer
    assert MODULE.ca_files() == []
    assert MODULE.ca_files(str(tmp_path / "absent")) == []
    make_ca(1)
    make_ca(10)
    (tmp_path / "ca-key-2.pem").write_text("a key whose certificate is gone\n")
    for junk in ("ca.pem.tmp", "ca-1.pem", "notes.txt", "ca-x.pem"):
        (tmp_path / junk).write_text("junk\n")
    assert MODULE.ca_files() == [
        {"generation": g, "cert": str(tmp_path / amp.ca_file_names(g)["cert"]),
         "key": str(tmp_path / amp.ca_file_names(g)["key"])} for g in (1, 2, 10)]


def test_signer_with_an_older_pillar_answers_from_a_fresh_one(signer):
    """CA rotation step 1 as README says it: the pillar is edited and
    `salt '*' state.apply apigee_mtls` runs. The requesting node's run sees the edit; the
    signer's minion still holds the pillar it loaded. The node's view differs: the signer
    asks the master for a fresh pillar and answers from it (generation 2 trusted)."""
    set_tls, make_ca, _ = signer
    make_ca(1)
    make_ca(2)
    edited = load_topology("5-node")
    edited["tls"] = {"ca_trust": [2]}
    FRESH["pillar"] = edited
    view = amp.pillar_fingerprint(edited)
    answer = MODULE.sign_agent_certificate(PUB, __pub_id="n4", view=view)
    assert answer["generations"] == [1, 2] and answer["ca_bundle"] == "CA 1\nCA 2\n"
    # the same view as the signer's own: no fresh pillar is compiled (it would be the old one)
    FRESH.clear()
    same = amp.pillar_fingerprint(load_topology("5-node"))
    answer = MODULE.sign_agent_certificate(PUB, __pub_id="n4", view=same)
    assert answer["generations"] == [1]


def test_fingerprint_ignores_secrets_only():
    base = load_topology("5-node")
    other = load_topology("5-node")
    other["secrets"] = {"gossip_key": "x", "connect_ca_key": "y"}
    assert amp.pillar_fingerprint(base) == amp.pillar_fingerprint(other)
    other["tls"] = {"ca_trust": [2]}
    assert amp.pillar_fingerprint(base) != amp.pillar_fingerprint(other)
