"""Real datastores through the mesh (issue 12): a lab booted with ``LAB_COMPONENTS=real``
(``make lab COMPONENTS=real``) runs ZooKeeper 3.8, PostgreSQL 15 and OpenLDAP from Debian 12
in place of the stand-ins (lab/real.py). Run by ``make test``'s ``real`` session
(``make lab-test-real``); a stand-in lab has no such programs, so this module is not part of
the other sessions.

Proven here, on the 5-node topology:

* the ZooKeeper ensemble forms through the mesh (one leader, two followers); ``zkCli.sh`` on
  a node without ZooKeeper writes through one server and reads through another, and a capture
  on the bridge meanwhile holds neither the value nor the path;
* ``psql`` on the management server's node runs a query on the Postgres primary through the
  mesh; the standby streams from the primary through the mesh (``pg_stat_replication``:
  ``streaming``), and catches up after it restarts.
"""
import os
import signal
import subprocess
import time
import uuid

import pytest

from conftest import labctl

pytestmark = pytest.mark.skipif(labctl.COMPONENTS != "real", reason=(
    "needs a lab with real datastores: LAB_COMPONENTS=real (make lab-test-real)"))

ZKCLI = "/usr/share/zookeeper/bin/zkCli.sh"
real = labctl.real


def _nodes(lab, component):
    return [n["id"] for n in real.real_nodes(lab.model, component)]


def _other(lab, *components):
    """A node running none of ``components`` (a client whose traffic must cross the mesh)."""
    return next(n["id"] for n in lab.model["nodes"]
                if not n["retired"] and not set(components) & set(n["components"]))


def zk_mode(lab, node):
    """``leader``, ``follower`` or the error: ZooKeeper's ``srvr`` on the node's own client
    port over loopback (not meshed; the command is sent and the answer read without a
    half-close)."""
    code = ("import socket\n"
            "s = socket.create_connection(('127.0.0.1', 2181), timeout=5)\n"
            "s.sendall(b'srvr')\nbuf = b''\n"
            "while True:\n"
            "    c = s.recv(4096)\n"
            "    if not c: break\n"
            "    buf += c\n"
            "print(buf.decode())\n")
    proc = lab.run(node, ["python3", "-c", code], check=False, timeout=20)
    for line in proc.stdout.splitlines():
        if line.startswith("Mode:"):
            return line.split(":", 1)[1].strip()
    return (proc.stdout + proc.stderr).strip()[-200:] or "no answer"


def wait_ensemble(lab, timeout=240):
    zk = _nodes(lab, "zookeeper")
    deadline = time.monotonic() + timeout
    while True:
        modes = {n: zk_mode(lab, n) for n in zk}
        if sorted(modes.values()) == sorted(["leader"] + ["follower"] * (len(zk) - 1)):
            return modes
        if time.monotonic() > deadline:
            raise AssertionError(f"no ZooKeeper quorum after {timeout}s: {modes}")
        time.sleep(3)


def zkcli(lab, node, server_ip, *argv, timeout=90):
    return lab.run(node, [ZKCLI, "-server", f"{server_ip}:2181", *argv], check=False,
                   timeout=timeout)


def psql(lab, node, host, sql, check=True):
    proc = lab.run(node, ["psql", "-h", host, "-p", "5432", "-U", "postgres", "-d", "postgres",
                          "-Atc", sql], check=check, timeout=60)
    return proc.stdout.strip()


def local_psql(lab, node, sql):
    return lab.run(node, ["runuser", "-u", "postgres", "--", "psql", "-Atc", sql],
                   timeout=60).stdout.strip()


def wait_for(what, fn, timeout=90, every=2):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(every)


@pytest.fixture(scope="module")
def real_lab(mesh):
    """The applied lab after ``labctl.py datastores`` (the standby made through the mesh,
    ZooKeeper servers holding pre-mesh quorum connections restarted), with a quorum."""
    proc = subprocess.run([labctl.sys.executable, os.path.join(labctl.REPO, "lab", "labctl.py"),
                           "datastores"], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait_ensemble(mesh)
    return mesh


def test_zookeeper_ensemble_forms_through_the_mesh(real_lab):
    modes = wait_ensemble(real_lab)
    assert list(modes.values()).count("leader") == 1, modes
    # the quorum ports carry the ensemble through the sidecars: connections into 2888/3888
    # come from the node's own IP (the ingress sidecar hands them over there), none from a
    # peer's address
    zk = _nodes(real_lab, "zookeeper")
    peers = {real_lab.ip[n] for n in zk}
    meshed = 0
    for node in zk:
        out = real_lab.run(node, ["ss", "-Htn", "state", "established"]).stdout
        direct = real.direct_quorum_connections(out, peers - {real_lab.ip[node]})
        assert not direct, f"{node}: a peer reached a quorum port directly: {direct}"
        # what arrives instead: from the node's own IP, the ingress sidecar's side
        meshed += len(real.direct_quorum_connections(out, {real_lab.ip[node]}))
    assert meshed >= len(zk) - 1, "no quorum connection through the sidecars"


def test_zkcli_writes_through_one_server_and_reads_through_another(real_lab):
    lab = real_lab
    client = _other(lab, "zookeeper")
    first, second = (lab.ip[n] for n in _nodes(lab, "zookeeper")[1:3])
    path = f"/amtls-{uuid.uuid4().hex[:12]}"
    value = "ZKVALUE-" + uuid.uuid4().hex
    pcap = os.path.join(labctl.STATE, "zk-capture.pcap")
    dump = subprocess.Popen(["tcpdump", "-i", labctl.BRIDGE, "-U", "-s", "0", "-w", pcap, "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        wrote = zkcli(lab, client, first, "create", path, value)
        read = zkcli(lab, client, second, "get", path)
        time.sleep(1.5)
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=10)
    assert f"Created {path}" in wrote.stdout + wrote.stderr, wrote.stdout + wrote.stderr
    assert value in read.stdout, read.stdout + read.stderr
    raw = open(pcap, "rb").read()
    os.unlink(pcap)
    assert len(raw) > 5000, "capture is empty: the test would prove nothing"
    assert value.encode() not in raw and path.encode() not in raw, \
        "ZooKeeper payload seen on the lab bridge"


def test_psql_from_the_management_server_reaches_the_primary_through_the_mesh(real_lab):
    lab = real_lab
    primary, _ = real.postgres_roles(lab.model)
    ms = next(n["id"] for n in lab.model["nodes"] if "management-server" in n["components"])
    assert ms != primary["id"]
    assert psql(lab, ms, primary["ip"], "select 40 + 2") == "42"
    # the primary sees the management server's session arrive from its own ingress sidecar
    seen = local_psql(lab, primary["id"], "select distinct client_addr from pg_stat_activity "
                                          "where client_addr is not null")
    assert lab.ip[ms] not in seen


def test_standby_streams_from_the_primary_through_the_mesh_and_catches_up(real_lab):
    lab = real_lab
    primary, standby = real.postgres_roles(lab.model)
    if standby is None:
        pytest.fail("the topology has one Postgres node: no standby to prove")
    state = wait_for("standby streaming", lambda: local_psql(
        lab, primary["id"], "select state || ' ' || client_addr from pg_stat_replication"
    ).startswith("streaming"))
    assert state
    rows = local_psql(lab, primary["id"], "select client_addr from pg_stat_replication")
    assert rows.strip() == "127.0.0.1", f"the standby's connection did not cross the mesh: {rows}"
    local_psql(lab, primary["id"], "create table if not exists amtls_probe (v text)")

    def replicated(value):
        return lambda: value in local_psql(lab, standby["id"], "select v from amtls_probe")

    value = uuid.uuid4().hex
    local_psql(lab, primary["id"], f"insert into amtls_probe values ('{value}')")
    wait_for("row on the standby", replicated(value))
    # the standby restarts: rows written meanwhile reach it, and it streams again
    lab.run(standby["id"], ["systemctl", "stop", "postgresql"])
    missed = uuid.uuid4().hex
    local_psql(lab, primary["id"], f"insert into amtls_probe values ('{missed}')")
    lab.run(standby["id"], ["systemctl", "start", "postgresql"])
    wait_for("row written while the standby was down", replicated(missed), timeout=120)
    wait_for("streaming again", lambda: local_psql(
        lab, primary["id"], "select state from pg_stat_replication") == "streaming")
    wait_for("replication lag back to 0", lambda: local_psql(
        lab, primary["id"], "select pg_current_wal_lsn() - replay_lsn from pg_stat_replication"
    ) == "0")
