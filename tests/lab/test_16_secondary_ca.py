"""Two data centres: the secondary's Connect CA (issue 15). Runs in the 12-node two-DC topology
session (make lab-test-topologies); the single-DC session leaves it out (Makefile).

Consul 1.8.7's secondary leader asks the primary to sign its CA intermediate once, when it takes
leadership, with its replication token. A refusal is logged as a warning and the CA is marked
initialised without an intermediate: every leaf of the data center then fails with "error
parsing CA cert: no PEM-encoded data found" until a leader change, or max_query_time (10 min).
The formula starts a secondary's servers with their tokens (so the first request is granted),
ends every run by obtaining the node's leaf, and lets the secondary's leader restart itself
when its CA has no intermediate."""
import os
import time

import pytest

from conftest import labctl, planner, state_summary

LEAF = """
import json, urllib.request, urllib.error
token = open("/etc/consul.d/acl/agent.token").read().strip()
svc = {service!r}
req = urllib.request.Request("http://127.0.0.1:8500/v1/agent/connect/ca/leaf/" + svc,
                             headers={{"X-Consul-Token": token}})
try:
    leaf = json.loads(urllib.request.urlopen(req, timeout=15).read())
    out = {{"ok": bool(leaf.get("CertPEM"))}}
except urllib.error.HTTPError as exc:
    out = {{"ok": False, "error": exc.read().decode()}}
roots = json.loads(urllib.request.urlopen("http://127.0.0.1:8500/v1/connect/ca/roots",
                                          timeout=5).read())
active = [r for r in roots["Roots"] if r["Active"]]
# the data center's own intermediate (Consul names a secondary's "sec-..."), besides any
# cross-signed certificate the primary's root carries
from cryptography import x509
subjects = [x509.load_pem_x509_certificate(p.encode()).subject.rfc4514_string()
            for p in (active[0].get("IntermediateCerts") or [] if active else [])]
out["own_intermediate"] = any(s.startswith("CN=sec-") for s in subjects)
print(json.dumps(out))
"""


def _dcs(lab):
    out = {}
    for node in lab.model["nodes"]:
        if not node["retired"]:
            out.setdefault(node["datacenter"], []).append(node)
    return out


@pytest.fixture(scope="module")
def secondary(applied):
    dcs = _dcs(applied)
    if len(dcs) < 2:
        pytest.skip("needs two data centres: runs in the 12-node-2dc topology session")
    applied.wait_mesh_ready(timeout=300)
    primary = applied.model["primary_datacenter"]
    dc = next(d for d in dcs if d != primary)
    nodes = dcs[dc]
    servers = [n["id"] for n in nodes if "zookeeper" in n["components"]]
    clients = [n["id"] for n in nodes if n["id"] not in servers]
    return applied, primary, dc, servers, clients


def _service(lab, node):
    """The service whose leaf the formula's check asks for (the planner's leaf_check)."""
    return planner.plan(lab.pillar, node)["leaf_check"]["service"]


def _leaf(lab, node):
    service = _service(lab, node)
    return lab.py(node, LEAF.format(service=service), token=None,
                  python="/opt/salt/bin/python3")


def _journal(lab, node):
    return lab.run(node, "journalctl -u consul --no-pager -o cat", timeout=60).stdout


def test_first_rollout_gets_the_intermediate_signed_at_once(secondary):
    """The fresh rollout (the session's first apply): no refusal was ever logged in the
    secondary, its CA has the intermediate, and its nodes get leaves."""
    lab, _, dc, servers, clients = secondary
    logs = {n: _journal(lab, n) for n in servers}
    refused = [n for n, text in logs.items() if "refused to sign our intermediate" in text]
    assert not refused, f"{dc} servers whose intermediate was refused: {refused}"
    assert any("received new intermediate certificate from primary datacenter" in text
               for text in logs.values()), f"no {dc} server logged its intermediate"
    for node in servers[:1] + clients[:1]:
        leaf = _leaf(lab, node)
        assert leaf["ok"] and leaf["own_intermediate"], (node, leaf)


CHAIN = """
import json, urllib.request
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
token = open("/etc/consul.d/acl/agent.token").read().strip()
req = urllib.request.Request("http://127.0.0.1:8500/v1/agent/connect/ca/leaf/{service}",
                             headers={{"X-Consul-Token": token}})
leaf = x509.load_pem_x509_certificate(json.loads(urllib.request.urlopen(req, timeout=15)
                                                 .read())["CertPEM"].encode())
roots = json.loads(urllib.request.urlopen("http://127.0.0.1:8500/v1/connect/ca/roots",
                                          timeout=5).read())
active = [r for r in roots["Roots"] if r["Active"]][0]
org = x509.load_pem_x509_certificate({org!r}.encode())
inter = [x509.load_pem_x509_certificate(p.encode()) for p in active["IntermediateCerts"]]
issuer = [c for c in inter if c.subject == leaf.issuer][0]
issuer.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes,
                           ec.ECDSA(leaf.signature_hash_algorithm))
org.public_key().verify(issuer.signature, issuer.tbs_certificate_bytes,
                        ec.ECDSA(issuer.signature_hash_algorithm))
print(json.dumps({{"root_is_org": active["RootCert"].strip() == {org!r}.strip(),
                  "leaf_issuer": leaf.issuer.rfc4514_string(),
                  "intermediate_issuer": issuer.issuer.rfc4514_string()}}))
"""


def test_secondary_leaves_chain_to_the_organisation_ca(secondary):
    """connect_ca with two data centres: the organisation's CA is the root in both; dc-2's
    leaves are signed by its own intermediate, which the organisation's CA signed (both
    signatures checked with the public keys)."""
    lab, _, _, servers, clients = secondary
    org_file = f"{labctl.STATE}/org-ca.pem"
    assert os.path.exists(org_file), "the lab's pillar has no organisation CA (connect_ca)"
    with open(org_file, encoding="utf-8") as fh:
        org = fh.read()
    for node in (servers[0], clients[0]):
        service = _service(lab, node)
        out = lab.py(node, CHAIN.format(service=service, org=org),
                     python="/opt/salt/bin/python3", token=None)
        assert out["root_is_org"], (node, out)
        assert out["intermediate_issuer"] == "CN=Example Org Mesh Root CA,O=Example Org", out
        assert out["leaf_issuer"] != out["intermediate_issuer"], out


def _break_secondary_ca(lab, servers, clients):
    """The secondary's servers lose their raft state and restart without their replication
    token (what the formula did before: the agent started before it had it). Their new leader
    initialises the CA; the primary refuses to sign; Consul marks it initialised anyway."""
    data_dir = lab.model["consul"]["data_dir"]
    drop_replication = (
        "import json; p = '/etc/consul.d/acl-tokens.json'; d = json.load(open(p)); "
        "d['acl']['tokens'].pop('replication', None); json.dump(d, open(p, 'w'))")
    for node in servers:
        lab.run(node, f"systemctl stop consul && rm -rf {data_dir}/raft "
                      f"{data_dir}/server_metadata.json && python3 -c \"{drop_replication}\"")
    for node in servers:
        lab.run(node, "systemctl start consul")
    # agents keep serving the leaves they cached (signed before); a restarted agent, a new
    # node or a renewal needs a new one
    for node in clients:
        lab.run(node, "systemctl restart consul")


def test_secondary_without_intermediate_fails_the_run_and_the_next_apply_heals_it(secondary):
    lab, primary, dc, servers, clients = secondary
    _break_secondary_ca(lab, servers, clients)
    # the symptom of the issue, reproduced: leaves fail, the active root has no intermediate
    deadline = time.monotonic() + 120
    leaf = None
    while time.monotonic() < deadline:
        leaf = _leaf(lab, clients[0])
        if "no PEM-encoded data found" in leaf.get("error", ""):
            break
        time.sleep(3)
    assert "no PEM-encoded data found" in leaf.get("error", ""), leaf
    assert not leaf["own_intermediate"], leaf
    logs = "".join(_journal(lab, n) for n in servers)
    assert "Primary datacenter refused to sign our intermediate CA certificate" in logs

    # a run on the secondary's clients cannot heal it (only its servers can): it fails, and
    # says why and what to apply; nothing else fails
    ret = lab.salt("-L", ",".join(clients), "state.apply", "apigee_mtls", "-t", "600")
    summary = state_summary(ret)
    for node in clients:
        failed = summary[node]["failed"]
        assert [f[0] for f in failed] == ["apigee-mtls-mesh-leaf-certificate-ready"], \
            (node, failed)
        comment = failed[0][1]
        assert "no PEM-encoded data found" in comment, comment
        assert (f"no intermediate certificate signed by the primary data center {primary}"
                in comment), comment
        assert f"Apply apigee_mtls on {dc}'s Consul servers ({', '.join(servers)})" in comment

    # the documented command heals it: the secondary's servers get their replication token
    # back, its leader restarts itself, the next leader gets the intermediate signed
    ret = lab.apply("*")
    summary = state_summary(ret)
    assert not {n: s["failed"] for n, s in summary.items() if s["failed"]}
    healed = [n for n in servers
              if ret[n]["apigee_mtls_|-apigee-mtls-mesh-leaf-certificate-ready_|-"
                        f"{_service(lab, n)}"
                        "_|-connect_leaf_ready"]["changes"].get("consul")]
    assert len(healed) == 1, f"leaders restarted: {healed}"
    lab.wait_mesh_ready(timeout=180)
    for node in [*servers, *clients]:
        leaf = _leaf(lab, node)
        assert leaf["ok"] and leaf["own_intermediate"], (node, leaf)

    # and the next run has nothing left to do
    rerun = state_summary(lab.apply("*"))
    assert {n: s["changed"] for n, s in rerun.items() if s["changed"]} == {}
