"""The traffic harness's probes of the real datastores (lab/traffic.py, a lab booted with
``--components real``): each speaks the datastore's own protocol. Here they talk to a scripted
peer over a socket pair, byte for byte as the protocols define the replies; the lab tests
(test_91) run them against ZooKeeper 3.8, PostgreSQL 15 and slapd."""
import os
import socket
import struct
import sys
import threading

import pytest
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "lab"))

import traffic  # noqa: E402  pylint: disable=wrong-import-position

TOPOLOGIES = os.path.join(os.path.dirname(__file__), "..", "topologies")
_PEERS = []  # the scripted peers' sockets, kept open until the test process ends


def _peer(steps, close=True):
    """A socket whose peer, for each ``(n, reply)`` of ``steps``, reads ``n`` bytes (what the
    probe sent is kept in ``got``) and writes ``reply``; then closes."""
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    got = []

    def run():
        for size, reply in steps:
            buf = b""
            while len(buf) < size:
                chunk = theirs.recv(size - len(buf))
                if not chunk:
                    break
                buf += chunk
            got.append(buf)
            theirs.sendall(reply)
        if close:
            theirs.close()
        else:
            _PEERS.append(theirs)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return ours, got, thread


def _pg(kind, body=b""):
    return kind + struct.pack(">i", len(body) + 4) + body


def test_targets_of_a_real_lab_use_the_client_ports_and_protocols():
    with open(os.path.join(TOPOLOGIES, "5-node.yaml"), encoding="utf-8") as fh:
        pillar = yaml.safe_load(fh)
    pillar = pillar.get("apigee_mtls", pillar)
    real = {(t["node"], t["component"]): (t["port"], t["protocol"])
            for t in traffic.targets_for(pillar, "n4", real=True)}
    assert real[("n1", "zookeeper")] == (2181, "zookeeper")
    assert real[("n5", "postgres")] == (5432, "postgres")
    assert real[("n1", "cassandra")][1] == "echo"
    standin = traffic.targets_for(pillar, "n4")
    assert {t["protocol"] for t in standin} == {"echo"}
    assert [(t["node"], t["component"]) for t in standin] == list(real)


def test_split_flows_probes_the_real_client_ports_and_leaves_the_quorum_ports_out():
    """A one-shot check of every flow (the topology sessions' flow and capture tests): on a
    lab with real datastores, ZooKeeper's 2181 and Postgres's 5432 are probed in their
    protocols, the quorum ports 2888/3888 are left to the ensemble, and the stand-ins' ports
    (Postgres's 8084, Cassandra's) answer as stand-ins; on a stand-in lab, every flow does."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "lab"))
    import real  # pylint: disable=import-outside-toplevel

    with open(os.path.join(TOPOLOGIES, "5-node.yaml"), encoding="utf-8") as fh:
        pillar = yaml.safe_load(fh)
    pillar = pillar.get("apigee_mtls", pillar)
    ups = traffic._planner().plan(pillar, "n2")["upstreams"]  # pylint: disable=protected-access
    echo, probed = traffic.split_flows(ups, real.REAL_PORTS)
    ports = {(u["component"], u["component_port"]) for u in echo}
    assert ("zookeeper", 2888) not in ports and ("zookeeper", 3888) not in ports
    assert any(u["component"] == "zookeeper" and u["component_port"] in (2888, 3888)
               for u in ups), "the control: n2 has quorum upstreams"
    assert ("cassandra", 9042) in ports or ("cassandra", 7000) in ports, ports
    assert {(t["component"], t["port"], t["protocol"]) for t in probed} >= {
        ("zookeeper", 2181, "zookeeper")}
    assert all(t["port"] == traffic.REAL_PROTOCOLS[t["component"]][0] for t in probed)
    assert len(echo) + len(probed) < len(ups)
    assert traffic.split_flows(ups) == (ups, [])


def test_probe_uses_each_target_once_and_names_a_failure():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    def answer():
        conn, _ = server.accept()
        conn.recv(4)
        conn.sendall(b"Zookeeper version: 3.8.0\nMode: leader\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    closed.close()
    out = traffic.probe([{"ip": "127.0.0.1", "port": port, "protocol": "zookeeper"},
                         {"ip": "127.0.0.1", "port": refused_port, "protocol": "zookeeper"}],
                        timeout=2)
    server.close()
    assert out[0] == {"ok": True}
    assert out[1]["error"].startswith("ConnectionRefusedError"), out


def test_zookeeper_srvr_passes_only_a_serving_server():
    sock, got, _ = _peer([(4, b"Zookeeper version: 3.8.0\nMode: follower\nNode count: 5\n")])
    traffic.ZooKeeper.new(sock, 1, {})
    assert got == [b"srvr"]
    sock, _, _ = _peer([(4, b"This ZooKeeper instance is not currently serving requests\n")])
    with pytest.raises(ValueError, match="not serving"):
        traffic.ZooKeeper.new(sock, 1, {})


def test_zookeeper_session_then_pings():
    connect = struct.pack(">iiqi", 0, 30000, 0x1234, 16) + bytes(16) + b"\0"
    ping_ok = struct.pack(">iqi", -2, 7, 0)
    sock, got, _ = _peer([(4 + 45, struct.pack(">i", len(connect)) + connect),
                          (12, struct.pack(">i", len(ping_ok)) + ping_ok)], close=False)
    traffic.ZooKeeper.open(sock, {})
    traffic.ZooKeeper.request(sock, 1, {})
    assert struct.unpack(">i", got[0][:4]) == (45,)  # ConnectRequest: 45 bytes
    assert got[1] == struct.pack(">iii", 8, -2, 11)  # a ping: xid -2, OpCode.ping 11
    lost = struct.pack(">iqi", -2, 7, -112)  # SESSIONEXPIRED
    sock, _, _ = _peer([(12, struct.pack(">i", len(lost)) + lost)], close=False)
    with pytest.raises(ValueError, match="err -112"):
        traffic.ZooKeeper.request(sock, 2, {})


def test_postgres_startup_query_and_terminate():
    ready = (_pg(b"R", struct.pack(">i", 0)) + _pg(b"S", b"server_version\x0015\x00")
             + _pg(b"K", struct.pack(">ii", 1, 2)) + _pg(b"Z", b"I"))
    row = (_pg(b"T", b"\x00\x01?column?\x00" + bytes(18)) + _pg(b"D", b"\x00\x01\x00\x00\x00\x017")
           + _pg(b"C", b"SELECT 1\x00") + _pg(b"Z", b"I"))
    startup = len(struct.pack(">i", 196608) + b"user\0postgres\0database\0postgres\0\0") + 4
    sock, got, _ = _peer([(startup, ready), (5 + len(b"select 7\0"), row)], close=False)
    traffic.Postgres.new(sock, 7, {})
    assert got[0][4:8] == struct.pack(">i", 196608)  # protocol 3.0
    assert got[1] == _pg(b"Q", b"select 7\x00")
    refused = _pg(b"E", b"SFATAL\x00C28000\x00Mno pg_hba.conf entry\x00\x00")
    sock, _, _ = _peer([(startup, refused)])
    with pytest.raises(ValueError, match="pg_hba"):
        traffic.Postgres.open(sock, {})


def test_ldap_anonymous_bind():
    ok = bytes([0x30, 0x0C, 0x02, 0x01, 0x03, 0x61, 0x07, 0x0A, 0x01, 0x00, 0x04, 0x00,
                0x04, 0x00])
    sock, got, _ = _peer([(14, ok)], close=False)
    traffic.Ldap.request(sock, 2, {})  # message ID 2 % 127 + 1 = 3
    assert got[0][:5] == bytes([0x30, 0x0C, 0x02, 0x01, 0x03]) and got[0][5] == 0x60
    refused = ok[:9] + bytes([49]) + ok[10:]  # invalidCredentials
    sock, _, _ = _peer([(14, refused)], close=False)
    with pytest.raises(ValueError, match="resultCode 49"):
        traffic.Ldap.request(sock, 2, {})
