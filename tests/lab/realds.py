"""Helpers of the real-datastore lab tests (``LAB_COMPONENTS=real``: test_90, test_91): ask the
real ZooKeeper, PostgreSQL and OpenLDAP how they are, on the nodes, and wait for them.

* :func:`zk_srvr`, :func:`wait_ensemble`: ZooKeeper's ``srvr`` on a server's own loopback;
* :func:`zkcli`: Debian's ``zkCli.sh`` against a server (through the mesh from another node);
* :func:`psql`, :func:`local_psql`: a query through the mesh, or as ``postgres`` locally;
* :func:`replication`, :func:`streaming`: the primary's view of its standby;
* :func:`ldapsearch`, :func:`ldapadd`: OpenLDAP's clients against a server on 10389;
* :func:`health`, :func:`assert_healthy`: a snapshot of both datastores, and the checks a
  day-2 operation must leave true."""
import time
import uuid

from conftest import TRAFFIC_PRELUDE, labctl

ZKCLI = "/usr/share/zookeeper/bin/zkCli.sh"
real = labctl.real

# the harness's ZooKeeper.srvr (lab/traffic.py), run in the node against its own client port
SRVR_CODE = (TRAFFIC_PRELUDE + "import socket\n"
             "s = socket.create_connection(('127.0.0.1', 2181), timeout=5)\n"
             "s.settimeout(5)\nprint(ns['ZooKeeper'].srvr(s))\n")


def nodes_of(lab, component):
    return [n["id"] for n in real.real_nodes(lab.model, component)]


def other_node(lab, *components):
    """A node running none of ``components`` whose own components may reach each of them (the
    planner's ``FLOWS``): a client whose traffic must cross the mesh, and may."""
    flows = labctl.planner.FLOWS
    return next(n["id"] for n in lab.model["nodes"]
                if not n["retired"] and not set(components) & set(n["components"])
                and all(any(c in flows.get(own, ()) for own in n["components"])
                        for c in components))


def zk_srvr(lab, node):
    """``{"mode": leader|follower|<error>, "epoch": int|None}``: ZooKeeper's ``srvr`` on the
    node's own client port over loopback (not meshed; sent without a half-close). The epoch is
    the high 32 bits of the zxid: it grows at every leader election."""
    proc = lab.run(node, ["python3", "-c", SRVR_CODE], check=False, timeout=20)
    out = {"mode": (proc.stdout + proc.stderr).strip()[-200:] or "no answer", "epoch": None}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(":")
        if key == "Mode":
            out["mode"] = value.strip()
        elif key == "Zxid":
            out["epoch"] = int(value.strip(), 16) >> 32
    return out


def zk_mode(lab, node):
    return zk_srvr(lab, node)["mode"]


def wait_ensemble(lab, timeout=240):
    """``{node: mode}`` once the ensemble has one leader and the rest followers."""
    zk = nodes_of(lab, "zookeeper")
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


def ldapsearch(lab, node, server_ip, base, scope="sub", filt="(objectClass=*)", timeout=30):
    """``ldapsearch`` (anonymous, LDIF without comments) on ``node`` against
    ``ldap://server_ip:10389``: through the mesh when the server is another node. Returns the
    completed process."""
    return lab.run(node, ["ldapsearch", "-x", "-LLL", "-o", "nettimeout=10", "-H",
                          f"ldap://{server_ip}:{real.LDAP_PORT}", "-b", base, "-s", scope, filt,
                          "dn"], check=False, timeout=timeout)


def ldapadd(lab, node, server_ip, ldif, timeout=30):
    """``ldapadd`` of ``ldif`` as the lab's rootDN on ``node`` against
    ``ldap://server_ip:10389``. Returns the completed process."""
    return lab.run(node, ["sh", "-c", f"printf '%s' '{ldif}' | ldapadd -x -H "
                          f"ldap://{server_ip}:{real.LDAP_PORT} -D {real.LDAP_ADMIN} "
                          f"-w {real.LDAP_ADMIN_PASSWORD}"], check=False, timeout=timeout)


def wait_for(what, fn, timeout=90, every=2):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(every)


def replication(lab):
    """The primary's ``pg_stat_replication`` row: ``{"pid", "state", "client_addr",
    "lag"}`` (lag: bytes between the primary's WAL and what the standby replayed), or
    ``None`` when no standby is connected."""
    primary, _ = real.postgres_roles(lab.model)
    row = local_psql(lab, primary["id"], "select pid, state, client_addr, "
                                         "pg_current_wal_lsn() - replay_lsn "
                                         "from pg_stat_replication")
    if not row:
        return None
    pid, state, addr, lag = row.splitlines()[0].split("|")
    return {"pid": pid, "state": state, "client_addr": addr, "lag": int(lag or -1)}


def streaming(lab, caught_up=True):
    """:func:`replication` when the standby streams (and, with ``caught_up``, with no lag),
    else ``None``: a condition for :func:`wait_for`."""
    rep = replication(lab)
    if rep and rep["state"] == "streaming" and (rep["lag"] == 0 or not caught_up):
        return rep
    return None


def health(lab, timeout=240):
    """Both datastores once they are whole: the ensemble (one leader, its epoch) and the
    standby streaming with no lag. Waits up to ``timeout`` seconds for that."""
    modes = wait_ensemble(lab, timeout=timeout)
    leader = next(n for n, m in modes.items() if m == "leader")
    rep = wait_for("the standby streaming with no replication lag", lambda: streaming(lab),
                   timeout=timeout)
    return {"leader": leader, "epoch": zk_srvr(lab, leader)["epoch"], "replication": rep}


def assert_healthy(lab, before=None):
    """What a day-2 operation must leave: a ZooKeeper quorum that serves a write through one
    server and the read through another from a node without ZooKeeper, the standby streaming
    through the mesh (from the primary's loopback: its sidecar) with the lag back to 0, a row
    written on the primary read on the standby, and ``psql`` from the management server
    through the mesh. ``before`` (an earlier :func:`health`): the leader, its epoch and the
    replication connection must be the same ones (no election, no reconnection). Returns the
    new :func:`health`."""
    now = health(lab)
    if before is not None:
        assert (now["leader"], now["epoch"]) == (before["leader"], before["epoch"]), \
            f"ZooKeeper elected again: {before} -> {now}"
        assert now["replication"]["pid"] == before["replication"]["pid"], \
            f"the standby's replication connection was re-made: {before} -> {now}"
    assert now["replication"]["client_addr"] == "127.0.0.1", now
    client = other_node(lab, "zookeeper")
    first, second = (lab.ip[n] for n in nodes_of(lab, "zookeeper")[-2:])
    path, value = f"/amtls-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex
    wrote = zkcli(lab, client, first, "create", path, value)
    assert f"Created {path}" in wrote.stdout + wrote.stderr, wrote.stdout + wrote.stderr
    read = zkcli(lab, client, second, "get", path)
    assert value in read.stdout, read.stdout + read.stderr
    primary, standby = real.postgres_roles(lab.model)
    local_psql(lab, primary["id"], "create table if not exists amtls_probe (v text)")
    local_psql(lab, primary["id"], f"insert into amtls_probe values ('{value}')")
    wait_for("the row on the standby", lambda: value in local_psql(
        lab, standby["id"], "select v from amtls_probe"))
    ms = next(n["id"] for n in lab.model["nodes"] if "management-server" in n["components"]
              and not n["retired"])
    assert psql(lab, ms, primary["ip"], f"select count(*) from amtls_probe where v = '{value}'") \
        == "1"
    return now
