"""Attacks on the mesh's identities, with Consul ACLs on (default deny), from a process on a
member node (node A = n4) against another node's identities (node B = n2): with no token
(any local process) and with A's own token (root on A, who can read A's token file). Each
attack has a control that shows the same request succeeds where it should, so a refusal
means the ACLs, not a broken request. Plus: the management token, and only it, reads and
writes intentions, KV, keyring and ACLs; the mesh root is the organisation's CA."""
import json

import pytest

from conftest import AGENT_TOKEN, MGMT_TOKEN, labctl, planner

A, B = "n4", "n2"

# one request to the local agent with a token from a file (or none); prints status and body
REQUEST = r"""
import json, urllib.error, urllib.request
method, path, token_file, body = {method!r}, {path!r}, {token_file!r}, {body!r}
req = urllib.request.Request("http://127.0.0.1:8500" + path, method=method,
                             data=None if body is None else json.dumps(body).encode())
if token_file:
    req.add_header("X-Consul-Token", open(token_file).read().strip())
try:
    with urllib.request.urlopen(req, timeout=15) as res:
        status, text = res.status, res.read().decode()
except urllib.error.HTTPError as exc:
    status, text = exc.code, exc.read().decode()
try:
    data = json.loads(text)
except ValueError:
    data = text
print(json.dumps({{"status": status, "body": data}}))
"""


def call(lab, node, method, path, token_file=None, body=None):
    # token=None: the lab's own token prelude stays out; the request sets its header itself
    return lab.py(node, REQUEST.format(method=method, path=path, token_file=token_file,
                                       body=body), token=None)


def refused(res):
    """Refused by the ACLs: 403, or the 500 Consul 1.8 answers for a denied keyring read
    ("Reading keyring denied by ACLs")."""
    return res["status"] == 403 or (res["status"] == 500 and "denied" in str(res["body"]))


def _identity(lab, node):
    """The node's egress identity (its role's)."""
    return planner.plan(lab.pillar, node)["egress"]["identity"]


def _svc(lab, node, prefix):
    return next(s for s in planner.plan(lab.pillar, node)["services"] if s["id"].startswith(prefix))


@pytest.fixture(scope="module")
def acl_lab(applied):
    applied.wait_mesh_ready()
    return applied


def test_acls_are_on_and_deny_by_default(acl_lab):
    lab = acl_lab
    anon = call(lab, A, "GET", "/v1/catalog/services")
    mine = call(lab, A, "GET", "/v1/catalog/services", AGENT_TOKEN)
    assert mine["status"] == 200 and len(mine["body"]) > 10, mine
    # anonymous sees nothing of the mesh (default deny filters the catalog)
    assert anon["status"] == 200 and not [s for s in anon["body"] if s != "consul"], anon
    assert call(lab, A, "GET", "/v1/acl/token/self")["status"] == 403
    assert call(lab, A, "GET", "/v1/acl/token/self", AGENT_TOKEN)["status"] == 200


def test_registering_another_nodes_service_is_refused(acl_lab):
    """A process on A registers a service under B's router instance name (and its sidecar):
    refused with no token and with A's own token; A may register its own name (control)."""
    lab = acl_lab
    theirs = _svc(lab, B, "rt-8081")["id"]
    mine = _svc(lab, A, "pg-5432")["id"]
    for token in (None, AGENT_TOKEN):
        for name in (theirs, theirs + "-sidecar-proxy"):
            body = {"ID": name + "-rogue", "Name": name, "Port": 18081}
            res = call(lab, A, "PUT", "/v1/agent/service/register", token, body)
            assert res["status"] == 403, (token, name, res)
    control = call(lab, A, "PUT", "/v1/agent/service/register", AGENT_TOKEN,
                   {"ID": mine + "-probe", "Name": mine, "Port": 15432})
    assert control["status"] == 200, control
    assert call(lab, A, "PUT", f"/v1/agent/service/deregister/{mine}-probe",
                AGENT_TOKEN)["status"] == 200
    # the catalog still has B's router on B only
    where = call(lab, B, "GET", f"/v1/catalog/service/{theirs}", AGENT_TOKEN)["body"]
    assert [s["Node"] for s in where] == [B], where


def test_another_nodes_leaf_certificate_is_refused(acl_lab):
    """A asks its agent for the mesh certificate of B's router: refused with no token and
    with A's own; A's own identities are issued (control)."""
    lab = acl_lab
    theirs = _svc(lab, B, "rt-8081")["id"]
    # B's role identity (A has another role) and B's per-node identity of earlier releases
    for identity in (theirs, _identity(lab, B), planner.egress_name(lab.ip[B])):
        for token in (None, AGENT_TOKEN):
            res = call(lab, A, "GET", f"/v1/agent/connect/ca/leaf/{identity}", token)
            assert res["status"] == 403 and "CertPEM" not in json.dumps(res), (identity, res)
    own = call(lab, A, "GET", f"/v1/agent/connect/ca/leaf/{_identity(lab, A)}", AGENT_TOKEN)
    assert own["status"] == 200 and "CertPEM" in own["body"], own


def test_intentions_are_read_and_written_with_the_management_token_only(acl_lab):
    lab = acl_lab
    signer = lab.model["tls"]["signer"]
    everything = call(lab, signer, "GET", "/v1/connect/intentions", MGMT_TOKEN)
    assert everything["status"] == 200
    assert len(everything["body"]) == len(planner.intentions(lab.pillar))
    # no token: nothing; A's token: only intentions that name one of A's own services (as
    # destination, which Consul needs to authorize A's inbound connections, or as source),
    # none between other nodes (e.g. n1's egress -> B's router)
    assert call(lab, A, "GET", "/v1/connect/intentions")["body"] == []
    seen = call(lab, A, "GET", "/v1/connect/intentions", AGENT_TOKEN)["body"]
    own = {s["name"] for s in planner.plan(lab.pillar, A)["services"]} | {"*"}
    assert seen, "A's token should read the intentions of its own services"
    foreign = [(i["SourceName"], i["DestinationName"]) for i in seen
               if i["SourceName"] not in own and i["DestinationName"] not in own]
    assert not foreign, foreign
    others = [i for i in everything["body"]
              if i["SourceName"] not in own and i["DestinationName"] not in own]
    assert others, "control: the cluster has intentions A must not see"
    # nobody but the management token writes one (e.g. to allow itself into B)
    rogue = {"SourceName": _identity(lab, A),
             "DestinationName": _svc(lab, B, "rt-8081")["id"], "Action": "allow"}
    for token in (None, AGENT_TOKEN):
        res = call(lab, A, "POST", "/v1/connect/intentions", token, rogue)
        assert res["status"] == 403, (token, res)


def test_kv_keyring_operator_and_acl_need_the_management_token(acl_lab):
    lab = acl_lab
    signer = lab.model["tls"]["signer"]
    put = call(lab, signer, "PUT", "/v1/kv/apigee-mtls-test/secret", MGMT_TOKEN, "s3cret")
    assert put["status"] == 200 and put["body"] is True, put
    try:
        assert call(lab, signer, "GET", "/v1/kv/apigee-mtls-test/secret",
                    MGMT_TOKEN)["status"] == 200
        for node in (A, B):
            for token in (None, AGENT_TOKEN):
                res = call(lab, node, "GET", "/v1/kv/apigee-mtls-test/secret", token)
                assert res["status"] == 403, (node, token, res)
        for path in ("/v1/operator/keyring", "/v1/operator/raft/configuration",
                     "/v1/acl/tokens", "/v1/acl/policies", "/v1/connect/ca/configuration"):
            assert call(lab, signer, "GET", path, MGMT_TOKEN)["status"] == 200, path
            # on B, a server: keyring operations only run against servers
            for token in (None, AGENT_TOKEN):
                res = call(lab, B, "GET", path, token)
                assert refused(res), (path, token, res)
    finally:
        call(lab, signer, "DELETE", "/v1/kv/apigee-mtls-test?recurse", MGMT_TOKEN)


def test_management_token_lives_on_the_signer_only(acl_lab):
    lab = acl_lab
    signer = lab.model["tls"]["signer"]
    token = lab.run(signer, f"cat {MGMT_TOKEN}").stdout.strip()
    assert call(lab, signer, "GET", "/v1/acl/token/self", MGMT_TOKEN)["body"]["Policies"][0][
        "Name"] == "global-management"
    for node in lab.nodes:
        if node == signer:
            continue
        assert lab.run(node, f"test -e {MGMT_TOKEN}", check=False).returncode != 0, node
        # not in any file the formula or Salt wrote on the node (Consul's own raft data on
        # the servers holds every token: that is Consul's store, not a copy of ours)
        hits = lab.run(node, ["grep", "-rlF", token, "/etc", "/var/cache/salt", "/tmp",
                              "/root"], check=False).stdout.split()
        assert not hits, (node, hits)


def test_mesh_certificates_chain_to_the_organisation_ca(acl_lab):
    """connect_ca: the lab's organisation CA is the active Connect root, and a sidecar's leaf
    is signed by it (checked with its public key); its private key is in no other node's
    pillar."""
    lab = acl_lab
    with open(f"{labctl.STATE}/org-ca.pem", encoding="utf-8") as fh:
        org = fh.read()
    roots = call(lab, A, "GET", "/v1/agent/connect/ca/roots", AGENT_TOKEN)["body"]
    active = [r for r in roots["Roots"] if r["Active"]]
    assert len(active) == 1 and active[0]["RootCert"].strip() == org.strip(), active
    leaf = call(lab, A, "GET", f"/v1/agent/connect/ca/leaf/{_identity(lab, A)}",
                AGENT_TOKEN)["body"]
    check = lab.py(A, f"""
import json
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives import hashes
ca = x509.load_pem_x509_certificate({org!r}.encode())
leaf = x509.load_pem_x509_certificate({leaf["CertPEM"]!r}.encode())
ca.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes,
                       ec.ECDSA(leaf.signature_hash_algorithm))
print(json.dumps([leaf.issuer.rfc4514_string(), ca.subject.rfc4514_string()]))
""", python="/opt/salt/bin/python3", token=None)
    assert check[0] == check[1], check
    signer = lab.model["tls"]["signer"]
    keys = lab.salt("*", "pillar.get", "apigee_mtls:secrets:connect_ca_key")
    assert keys[signer], "the signer has no connect_ca_key"
    assert all(not keys[n] for n in lab.nodes if n != signer), {n: bool(v) for n, v in
                                                                  keys.items()}


def test_a_client_writes_only_its_own_restart_key(acl_lab):
    """A client's token takes its own restart key (apigee_mtls/restart/clients/<node>) and
    reads the restart lock, but cannot take the lock, another node's key or a server's
    records: a rogue client cannot stall or reorder the servers' restarts."""
    lab = acl_lab
    prefix = "/v1/kv/apigee_mtls/"
    own = call(lab, A, "PUT", f"{prefix}restart/clients/{A}", AGENT_TOKEN, A)
    assert own["status"] == 200 and own["body"] is True, own  # the control
    try:
        assert call(lab, A, "GET", f"{prefix}restart/?recurse", AGENT_TOKEN)["status"] in (
            200, 404)
        for key in ("restart/lock", f"restart/clients/{B}", f"restart/pending/{A}",
                    f"binary/{A}"):
            res = call(lab, A, "PUT", prefix + key, AGENT_TOKEN, A)
            assert res["status"] == 403, (key, res)
        res = call(lab, A, "PUT", "/v1/session/create", AGENT_TOKEN, {"Node": B, "TTL": "10s"})
        assert res["status"] == 403, res
    finally:
        call(lab, A, "DELETE", f"{prefix}restart/clients/{A}", AGENT_TOKEN)
