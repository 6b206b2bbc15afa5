"""The real-datastore lab's configuration (lab/real.py, ``labctl up --components real``): server
lists by node IP as Apigee writes them, the stand-in leaving exactly the real programs' ports,
the Postgres roles and the standby script."""
import os
import sys

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "lab"))

import labctl  # noqa: E402  pylint: disable=wrong-import-position
import real  # noqa: E402  pylint: disable=wrong-import-position

TOPOLOGIES = os.path.join(os.path.dirname(__file__), "..", "topologies")


def model(name):
    with open(os.path.join(TOPOLOGIES, name), encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    return labctl.planner.normalize(data.get("apigee_mtls", data))


def test_zoo_cfg_lists_every_zookeeper_node_by_ip_in_topology_order():
    m = model("5-node.yaml")
    cfg = real.zoo_cfg(m)
    zk = [n for n in m["nodes"] if "zookeeper" in n["components"]]
    assert [x for x in cfg.splitlines() if x.startswith("server.")] == [
        f"server.{i}={n['ip']}:2888:3888" for i, n in enumerate(zk, start=1)]
    assert "clientPort=2181" in cfg and "admin.enableServer=false" in cfg
    assert "4lw.commands.whitelist=*" in cfg


def test_the_stand_in_leaves_only_the_real_programs_ports():
    m = model("5-node.yaml")
    n1 = next(n for n in m["nodes"] if n["id"] == "n1")  # cass, ui, ms, ldap, zk
    n4 = next(n for n in m["nodes"] if n["id"] == "n4")  # postgres, qpid
    ports = lambda cfg: {(x["component"], x["port"]) for x in cfg["listeners"]}  # noqa: E731
    standin, mixed = (ports(labctl.standin_config(n1, m, c)) for c in ("standin", "real"))
    assert standin - mixed == {("zookeeper", 2181), ("zookeeper", 2888), ("zookeeper", 3888),
                               ("openldap", 10389)}
    assert ("cassandra", 9042) in mixed and ("management-server", 8080) in mixed
    pg = ports(labctl.standin_config(n4, m, "real"))
    assert ("postgres", 5432) not in pg and {("postgres", 8084), ("postgres", 4530)} <= pg


def test_postgres_roles_put_the_standby_in_the_second_data_center():
    primary, standby = real.postgres_roles(model("12-node-2dc.yaml"))
    assert (primary["datacenter"], standby["datacenter"]) == ("dc-1", "dc-2")
    primary, standby = real.postgres_roles(model("5-node.yaml"))
    assert (primary["id"], standby["id"]) == ("n4", "n5")


def test_the_standby_backs_up_the_primary_through_its_address_and_is_idempotent():
    script = real.standby_script("10.77.0.14")
    assert "pg_basebackup -h 10.77.0.14 -p 5432" in script and " -R " in script
    # a standby already pointing at that primary is left alone
    assert script.index("exit 0") < script.index("systemctl stop postgresql")


def test_direct_quorum_connections_are_the_ones_from_a_peers_address():
    ss = ("0 0 10.77.0.12:2888 10.77.0.13:40012\n"     # a peer, directly: before the mesh
          "0 0 [::ffff:10.77.0.12]:3888 [::ffff:10.77.0.11]:45260\n"  # the same, JVM on [::]
          "0 0 10.77.0.12:45678 10.77.0.11:3888\n"     # outgoing: meshed or not, it looks so
          "0 0 10.77.0.12:2888 10.77.0.12:51000\n"     # the ingress sidecar (node_ip target)
          "0 0 10.77.0.12:10004 10.77.0.13:33333\n"    # a sidecar port: the mesh itself
          "0 0 10.77.0.12:2181 10.77.0.14:40000\n")    # client port: not a quorum connection
    assert real.direct_quorum_connections(ss, {"10.77.0.11", "10.77.0.13"}) == [
        "10.77.0.12:2888 10.77.0.13:40012",
        "[::ffff:10.77.0.12]:3888 [::ffff:10.77.0.11]:45260"]


def test_the_docstring_examples_hold():
    import doctest  # pylint: disable=import-outside-toplevel
    assert doctest.testmod(real).failed == 0


def test_pg_hba_trusts_the_sidecar_loopback_then_apigee_peers_by_ip():
    m = model("5-node.yaml")
    hba = real.pg_hba(m)
    lines = [line.split() for line in hba.splitlines() if line.startswith("host")]
    assert ["host", "replication", "all", "127.0.0.1/32", "trust"] in lines
    peers = [n["ip"] for n in m["nodes"]
             if {"management-server", "postgres"} & set(n["components"])]
    by_ip = sorted({line[3] for line in lines if not line[3].startswith(("127.", "::1"))})
    assert by_ip == sorted(f"{ip}/32" for ip in peers)
    # the sidecar's entries come first: pg_hba's first match wins
    assert [line[3] for line in lines].index("127.0.0.1/32") == 0


def test_ldap_replication_consumes_every_other_server_by_ip_and_is_idempotent():
    m = model("13-node.yaml")
    first, second = (n for n in m["nodes"] if "openldap" in n["components"])
    one, two = (real.ldap_replication_script(m, n) for n in (first, second))
    # each consumes from the other one's node IP on Apigee's port, never from itself
    assert f"provider=ldap://{second['ip']}:10389" in one
    assert f"provider=ldap://{first['ip']}:10389" in two
    assert f"ldap://{first['ip']}" not in one and f"ldap://{second['ip']}" not in two
    assert "olcServerID: 1" in one and "olcServerID: 2" in two
    for script in (one, two):
        assert "olcMirrorMode: TRUE" in script and "olcOverlay: syncprov" in script
        # set up once: a server that already replicates is left alone
        assert script.index("exit 0") < script.index("ldapmodify")
    # only the second starts from an empty database (the first's base entry replicates)
    assert "rm -f /var/lib/ldap/data.mdb" in two and "rm -f /var/lib/ldap" not in one


def test_the_slapd_unit_makes_its_runtime_directory():
    assert "RuntimeDirectory=slapd" in real.SLAPD_UNIT and "User=openldap" in real.SLAPD_UNIT
