"""OpenLDAP through the mesh (issue 12), on a lab with real datastores whose topology has two
LDAP servers: 13-node (n4 and n5, apart from the management servers n6 and n7) and 12-node
two-DC (n1 in dc-1 and n7 in dc-2, each beside a management server: replication crosses data
centres). Run by ``make test``'s 13- and 12-node topology sessions (``make lab-test-topologies``).

Proven here:

* ``ldapsearch`` on a management server's node reads the directory of each LDAP server on
  another node through the mesh: the server sees the query arrive from its own ingress sidecar (loopback), and a
  capture on the bridge holds no LDAP payload;
* the LDAP servers replicate each other (multi-provider syncrepl, as Apigee's, set up by
  ``labctl.py datastores``: lab/real.py ``ldap_replication_script``) through the mesh: an
  entry added on either appears on the other, the capture holds neither entry, and no
  replication connection reaches a server from its peer's address.
"""
import uuid

import pytest

import realds
from conftest import bridge_capture, labctl

pytestmark = pytest.mark.skipif(labctl.COMPONENTS != "real", reason=(
    "needs a lab with real datastores: LAB_COMPONENTS=real (make lab-test-topologies)"))

real = labctl.real


@pytest.fixture(scope="module")
def ldap_lab(mesh):
    """The meshed lab (its ``mesh`` fixture ran ``labctl.py datastores``: syncrepl between the
    LDAP servers), with two LDAP servers."""
    ldap = realds.nodes_of(mesh, "openldap")
    if len(ldap) < 2:
        pytest.fail(f"the topology has {len(ldap)} LDAP server(s): replication needs two "
                    "(run this module on the 13- or 12-node topology)")
    return mesh


def _ms_apart_from(lab, server):
    """A management server's node other than ``server`` (its queries cross the mesh)."""
    return next(n["id"] for n in lab.model["nodes"]
                if "management-server" in n["components"] and n["id"] != server)


def _inbound_from(lab, node, ips):
    """Established connections into ``node``'s 10389 from any of ``ips``."""
    out = lab.run(node, ["ss", "-Htn", "state", "established"]).stdout
    return real.direct_connections(out, [real.LDAP_PORT], ips)


def test_ldapsearch_from_the_management_server_through_the_mesh(ldap_lab):
    lab = ldap_lab
    clients = {server: _ms_apart_from(lab, server) for server in realds.nodes_of(lab, "openldap")}
    marker = "amtls" + uuid.uuid4().hex[:16]
    with bridge_capture("ldap-search") as capture:
        for server, ms in clients.items():
            base = realds.ldapsearch(lab, ms, lab.ip[server], real.LDAP_BASE, scope="base")
            assert base.returncode == 0 and f"dn: {real.LDAP_BASE}" in base.stdout, \
                f"{ms} -> {server}: {base.stdout}{base.stderr}"
            # a filter nobody matches: its value crosses the bridge only inside TLS
            miss = realds.ldapsearch(lab, ms, lab.ip[server], real.LDAP_BASE,
                                     filt=f"(cn={marker})")
            assert miss.returncode == 0 and "dn:" not in miss.stdout, miss.stdout + miss.stderr
    raw = capture["raw"]
    assert len(raw) > 5000, "capture is empty: the test would prove nothing"
    assert marker.encode() not in raw, "LDAP payload seen on the lab bridge"
    for server, ms in clients.items():
        assert not _inbound_from(lab, server, {lab.ip[ms]}), \
            f"{server}: the management server's query arrived directly"


def test_an_entry_added_on_either_ldap_server_replicates_to_the_other(ldap_lab):
    lab = ldap_lab
    first, second = realds.nodes_of(lab, "openldap")[:2]
    added = {}
    with bridge_capture("ldap-syncrepl") as capture:
        for source, replica in ((first, second), (second, first)):
            cn = "amtls" + uuid.uuid4().hex[:16]
            ldif = f"dn: cn={cn},{real.LDAP_BASE}\nobjectClass: organizationalRole\ncn: {cn}\n"
            proc = realds.ldapadd(lab, source, "127.0.0.1", ldif)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            realds.wait_for(f"cn={cn} added on {source} seen on {replica}", lambda: (
                f"dn: cn={cn}," in realds.ldapsearch(
                    lab, replica, "127.0.0.1", real.LDAP_BASE, filt=f"(cn={cn})").stdout),
                timeout=60, every=1)
            added[cn] = (source, replica)
    raw = capture["raw"]
    assert len(raw) > 5000, "capture is empty: the test would prove nothing"
    for cn in added:
        assert cn.encode() not in raw, f"the replicated entry cn={cn} seen on the lab bridge"
    # the replication sessions (refreshAndPersist: long-lived) arrive from the ingress sidecar
    for server, peer in ((first, second), (second, first)):
        assert not _inbound_from(lab, server, {lab.ip[peer]}), \
            f"{server}: {peer}'s replication arrived directly, not through the mesh"
        assert _inbound_from(lab, server, {"127.0.0.1"}), \
            f"{server}: no replication session through its ingress sidecar"
