"""The move from per-node to role identities on a running cluster, under traffic (issue 14).

Release 0.3.0 gave every node's egress proxy its own identity (``egress-<ip>``), so the
intentions grew with the square of the nodes. Now a node's egress identity is its role (its
component set). Consul 1.8's built-in proxy takes its identity only when it starts, so the
move runs the new proxy next to the old one: the old instance stays registered (draining
file) and keeps its intentions; the nat rules move new connections to the new proxy once it
reaches every upstream the old one reaches; the old proxy stops once it carries none.

The lab runs the formula as 0.3.0 shipped it (staged from git), then the operator upgrades
the formula and runs the README's ``salt '*' state.apply apigee_mtls`` once, while every node
keeps opening connections through every flow and holds long-lived ones. Not one may fail."""
import io
import subprocess
import tarfile
import tempfile

import pytest

from conftest import MGMT_TOKEN, REPO, assert_no_loss, labctl, planner, state_summary, under_traffic

#: the last commit with per-node egress identities (release 0.3.0)
PER_NODE_RELEASE = "7ee689150bee7a3b9eb1dc1077ecc13cbd1e1b21"
EGRESS_UNITS = ("systemctl list-units --plain --no-legend --state=active "
                "'apigee-mtls-proxy@egress-*'")


def _stage(tree):
    """Serve ``tree``'s formula from the lab master and sync it to every minion."""
    labctl.dist.stage(labctl.FORMULA_ROOT, repo=tree)


def _egress_units(lab, node):
    out = lab.run(node, EGRESS_UNITS).stdout
    return sorted(line.split()[0].replace(".service", "") for line in out.splitlines() if line)


def _intentions(lab):
    """Every intention, read on the signer with the management token."""
    return lab.py(lab.signer, "import json, urllib.request\nprint(json.dumps(json.load("
                  "urllib.request.urlopen('http://127.0.0.1:8500/v1/connect/intentions'))))",
                  token=MGMT_TOKEN)


@pytest.fixture(scope="module")
def per_node_cluster(mesh):
    """The lab on release 0.3.0's formula: per-node egress identities everywhere."""
    lab = mesh
    lab.signer = lab.model["tls"]["signer"]
    old = tempfile.mkdtemp(prefix="apigee-mtls-0.3.0-")
    archive = subprocess.run(["git", "-C", REPO, "archive", "--format=tar", PER_NODE_RELEASE],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(old)  # noqa: S202 (our own repository's tree)
    _stage(old)
    try:
        lab.salt("*", "saltutil.sync_all")
        ret = lab.apply()
        summary = state_summary(ret)
        assert not {n: s["failed"] for n, s in summary.items() if s["failed"]}, summary
        lab.wait_mesh_ready()
        for node in lab.nodes:
            assert _egress_units(lab, node) == [
                "apigee-mtls-proxy@" + planner.egress_name(lab.ip[node])], node
    finally:
        _stage(REPO)
    lab.salt("*", "saltutil.sync_all")
    yield lab
    lab.wait_mesh_ready()


def test_move_to_role_identities_is_one_apply_without_a_failed_connection(per_node_cluster):
    lab = per_node_cluster
    per_node = len(lab.nodes)
    before = _intentions(lab)
    assert {i["SourceName"] for i in before} - {"*"} == {
        planner.egress_name(lab.ip[n]) for n in lab.nodes}

    ret, tot = under_traffic(lab, "move to role identities (upgrade from 0.3.0)", lab.apply)
    summary = state_summary(ret)
    assert not {n: s["failed"] for n, s in summary.items() if s["failed"]}, summary
    assert_no_loss(tot)

    plans = {n: lab.salt(n, "apigee_mtls.plan")[n] for n in lab.nodes}
    for node in lab.nodes:
        egress = plans[node]["egress"]
        # new connections go to the role's proxy, on its own loopback address
        nat = lab.run(node, "iptables -w -t nat -S APIGEE-MTLS-OUT").stdout
        assert f"--to-destination {egress['bind_address']}:" in nat and "REDIRECT" not in nat
        states = ret[node]
        switch = next(s for k, s in states.items() if "egress-switch-ready" in k)
        assert "reach" in switch["comment"], switch

    # the traffic has stopped: its long-lived connections are closed; the next run stops
    # every per-node proxy and removes their intentions
    ret = lab.apply()
    summary = state_summary(ret)
    assert not {n: s["failed"] for n, s in summary.items() if s["failed"]}, summary
    ret = lab.apply()  # the signer saw the per-node instances deregistered: it prunes now
    for node in lab.nodes:
        assert _egress_units(lab, node) == [plans[node]["egress"]["unit"]], node
        assert lab.run(node, f"test -e {plans[node]['egress']['draining_file']}",
                       check=False).returncode != 0, node
    after = _intentions(lab)
    want = planner.intentions(lab.pillar)
    assert sorted((i["SourceName"], i["DestinationName"]) for i in after) == sorted(
        (i["source"], i["destination"]) for i in want)
    roles = {plans[n]["egress"]["identity"] for n in lab.nodes}
    assert {i["SourceName"] for i in after} - {"*"} == roles
    assert len(roles) < per_node
    print(f"intentions: {len(before)} per-node -> {len(after)} per role "
          f"({len(roles)} roles, {per_node} nodes)")
    # idempotent afterwards
    again = state_summary(lab.apply())
    assert not any(s["changed"] for s in again.values()), again
    lab.wait_mesh_ready()
