#!/usr/bin/env python3
"""Traffic harness: Apigee-like clients that keep using the mesh while an operation runs, and
count what failed.

On every node it starts (``systemd-run``, a transient unit ``apigee-traffic``) a small client,
standard library only, that for each target (one per destination component per remote node the
node's components may reach, aimed at the component's real address: the node's iptables rules
redirect it into the mesh):

- opens a **new connection** every ``interval`` seconds (0.1 by default), to each target in
  turn (every target is used every ``interval`` x number of targets), sends a line, reads
  the component's reply (the lab's stand-ins answer each line with who they are), and closes;
- holds one **long-lived connection** that sends a line every ``long_interval`` seconds and
  reads the reply; a connection that errors or answers wrongly counts as broken, and is
  reopened;
- samples the local Consul agent's ``/v1/status/leader`` every second: the leader it names, no
  leader (the agent answered, with none), or no answer (the agent itself restarting).

A request (connect, send, reply) fails after ``timeout`` seconds, 5 by default: the connect
timeouts of the clients Apigee's components use are of that order or longer (the DataStax
Cassandra Java driver's default is 5 s, PostgreSQL JDBC's 10 s). While a
Consul agent restarts the formula holds new connections (their SYNs dropped) instead of
refusing them; TCP sends a SYN again after 1 s and 3 s, so a held connection completes
late rather than fails. The report gives the slowest successful new connection, so that a
delay is seen, not hidden.

It stops by itself after ``max_seconds`` (or when told to), and writes a JSON report. The host
side (:class:`Traffic`) picks the targets from the planner, starts the clients, stops them and
sums the reports: failed new connections, broken long-lived connections, the longest gap
between two successful requests of one target, samples without a leader, and leader changes.

Used by the lab tests (day-2 operations under traffic) and ``bench/run.py``::

    traffic = Traffic(lab)          # lab: tests/lab/conftest.py's Lab
    traffic.start()
    ...                              # the operation
    report = traffic.stop()          # {"totals": {...}, "nodes": {...}}
"""
import json
import os
import socket
import struct
import sys
import threading
import time
import urllib.error
import urllib.request

UNIT = "apigee-traffic"
NODE_DIR = "/run/apigee-traffic"
#: seconds between two new connections of a node (the default): at 0.05, 100 mTLS handshakes
#: a second kept a 2-core CI host saturated, and an apply under traffic took twice as long
INTERVAL = 0.1
#: the controls' rate (a sidecar or a ZooKeeper follower stopped 4 s): their windows last
#: seconds, and their minimum counts assume this rate
CONTROL_INTERVAL = 0.05


# ---------------------------------------------------------------------------------------------
# the client, inside a node
class _Target:
    def __init__(self, spec):
        self.spec = spec
        self.lock = threading.Lock()
        self.new_ok = self.new_failed = 0
        self.long_ok = self.long_broken = 0
        self.failures = []  # [(seconds since start, kind, error)], the first ones
        self.last_ok = None
        self.max_gap = 0.0
        self.slowest_new = 0.0

    def ok(self, kind, now):
        with self.lock:
            if kind == "new":
                self.new_ok += 1
            else:
                self.long_ok += 1
            if self.last_ok is not None:
                self.max_gap = max(self.max_gap, now - self.last_ok)
            self.last_ok = now

    def failed(self, kind, now, t0, error):
        with self.lock:
            if kind == "new":
                self.new_failed += 1
            else:
                self.long_broken += 1
            if len(self.failures) < 20:
                self.failures.append((round(now - t0, 2), kind, error[:160]))

    def report(self, now):
        with self.lock:
            gap = self.max_gap
            if self.last_ok is not None:
                gap = max(gap, now - self.last_ok)
            return {"target": self.spec, "new_ok": self.new_ok, "new_failed": self.new_failed,
                    "long_ok": self.long_ok, "long_broken": self.long_broken,
                    "max_gap": round(gap, 3), "slowest_new": round(self.slowest_new, 3),
                    "failures": self.failures}


def _request(sock, payload, target):
    """Send one line, read one line; raise when the reply is not the target's component."""
    sock.sendall(payload.encode() + b"\n")
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed without reply" if not buf else "closed mid-reply")
        buf += chunk
    reply = json.loads(buf)
    if reply.get("node") != target["node"] or reply.get("port") != target["port"]:
        raise ValueError(f"wrong reply {reply.get('node')}:{reply.get('port')}")
    return reply


# -- the real datastores' own protocols (a lab booted with --components real) -----------------
def _recv_exact(sock, size):
    buf = b""
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {size} bytes")
        buf += chunk
    return buf


def _zk_frame(sock, body=None):
    """Send a length-prefixed ZooKeeper frame (``body``) and/or read one; returns its body."""
    if body is not None:
        sock.sendall(struct.pack(">i", len(body)) + body)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    return _recv_exact(sock, size)


class Echo:
    """The stand-ins: a line out, the component's identity back."""

    @staticmethod
    def new(sock, n, spec):
        _request(sock, f"new {n}", spec)

    @staticmethod
    def open(sock, spec):
        """Nothing to set up on a long-lived connection."""

    @staticmethod
    def request(sock, n, spec):
        _request(sock, f"long {n}", spec)


class ZooKeeper:
    """New connection: the ``srvr`` four-letter word, answered only by a server that serves
    (``Mode:``); sent without a half-close, read to the server's close. Long-lived
    connection: a client session (ConnectRequest), then a ping (xid -2, type 11) per request,
    as ZooKeeper's clients keep their session alive."""

    @staticmethod
    def srvr(sock):
        """Send ``srvr`` (no half-close) and return the reply, read to the server's close."""
        sock.sendall(b"srvr")
        buf = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return buf.decode(errors="replace")
            buf += chunk

    @classmethod
    def new(cls, sock, n, spec):
        buf = cls.srvr(sock).encode()
        if b"Mode:" not in buf:
            raise ValueError("not serving: " + (buf.decode(errors="replace").strip()[:80]
                                                or "closed without reply"))

    @staticmethod
    def open(sock, spec):
        # protocolVersion, lastZxidSeen, timeOut (ms), sessionId, passwd (16 bytes), readOnly
        body = struct.pack(">iqiqi", 0, 0, 30000, 0, 16) + bytes(16) + b"\0"
        reply = _zk_frame(sock, body)
        _version, timeout, session = struct.unpack(">iiq", reply[:16])
        if timeout <= 0 or session == 0:
            raise ValueError("session refused")

    @staticmethod
    def request(sock, n, spec):
        xid, _zxid, err = struct.unpack(">iqi", _zk_frame(sock, struct.pack(">ii", -2, 11))[:16])
        if xid != -2 or err != 0:
            raise ValueError(f"ping answered xid {xid} err {err}")


class Postgres:
    """PostgreSQL's wire protocol 3.0: a startup as ``postgres`` (the lab's pg_hba trusts
    what arrives from the local sidecar), then ``select <n>`` per request. New connection:
    startup, one query, Terminate."""

    @staticmethod
    def _messages(sock):
        while True:
            kind = _recv_exact(sock, 1)
            (size,) = struct.unpack(">i", _recv_exact(sock, 4))
            yield kind, _recv_exact(sock, size - 4)

    @classmethod
    def _until_ready(cls, sock):
        got = []
        for kind, body in cls._messages(sock):
            if kind == b"E":
                raise ValueError("postgres error: " + body.decode(errors="replace")[:120])
            got.append((kind, body))
            if kind == b"Z":
                return got
        return got

    @classmethod
    def open(cls, sock, spec):
        params = b"user\0postgres\0database\0postgres\0\0"
        body = struct.pack(">i", 196608) + params
        sock.sendall(struct.pack(">i", len(body) + 4) + body)
        got = cls._until_ready(sock)
        if (b"R", struct.pack(">i", 0)) not in got:
            raise ValueError("no AuthenticationOk")

    @classmethod
    def request(cls, sock, n, spec):
        sql = f"select {n}".encode() + b"\0"
        sock.sendall(b"Q" + struct.pack(">i", len(sql) + 4) + sql)
        rows = [body for kind, body in cls._until_ready(sock) if kind == b"D"]
        if not rows or not rows[0].endswith(str(n).encode()):
            raise ValueError(f"select {n}: wrong answer {rows[:1]}")

    @classmethod
    def new(cls, sock, n, spec):
        cls.open(sock, spec)
        cls.request(sock, n, spec)
        sock.sendall(b"X" + struct.pack(">i", 4))


class Ldap:
    """LDAPv3: an anonymous simple bind (BER by hand: the message ID is the request number
    modulo 127, plus 1), success (resultCode 0) expected."""

    @staticmethod
    def open(sock, spec):
        """An LDAP connection needs nothing before its first bind."""

    @staticmethod
    def request(sock, n, spec):
        msgid = n % 127 + 1
        sock.sendall(bytes([0x30, 0x0C, 0x02, 0x01, msgid, 0x60, 0x07, 0x02, 0x01, 0x03,
                            0x04, 0x00, 0x80, 0x00]))
        head = _recv_exact(sock, 2)
        if head[0] != 0x30 or head[1] & 0x80:
            raise ValueError(f"not an LDAP message: {head.hex()}")
        body = _recv_exact(sock, head[1])
        # 02 01 <id> 61 <len> 0a 01 <resultCode>
        if body[:3] != bytes([0x02, 0x01, msgid]) or body[3] != 0x61 or body[5:7] != b"\x0a\x01":
            raise ValueError(f"not a bind response: {body.hex()[:40]}")
        if body[7] != 0:
            raise ValueError(f"bind refused, resultCode {body[7]}")

    new = request


PROTOCOLS = {"echo": Echo, "zookeeper": ZooKeeper, "postgres": Postgres, "ldap": Ldap}


def probe(specs, timeout=5.0):
    """Use each target once, on a new connection, as the harness's new connections do.

    :param list specs: target dicts (``ip``, ``port``, ``protocol``, and ``node`` for
        ``echo``), e.g. from :func:`targets_for`
    :param float timeout: seconds, per connection and per read
    :returns: one dict per spec, in order: ``{"ok": True}`` or ``{"error": "<type>: <why>"}``
    """
    out = []
    for spec in specs:
        try:
            with socket.create_connection((spec["ip"], spec["port"]), timeout=timeout) as sock:
                sock.settimeout(timeout)
                PROTOCOLS[spec.get("protocol", "echo")].new(sock, 1, spec)
            out.append({"ok": True})
        except Exception as exc:  # pylint: disable=broad-except
            out.append({"error": f"{type(exc).__name__}: {exc}"})
    return out


def _new_connections(tgt, cfg, stop, t0, offset):
    spec, n = tgt.spec, 0
    every = cfg["interval"] * len(cfg["targets"])
    stop.wait(offset)
    while not stop.is_set():
        started = time.monotonic()
        n += 1
        try:
            with socket.create_connection((spec["ip"], spec["port"]), timeout=cfg["timeout"]) as s:
                s.settimeout(cfg["timeout"])
                PROTOCOLS[spec.get("protocol", "echo")].new(s, n, spec)
            now = time.monotonic()
            tgt.ok("new", now)
            with tgt.lock:
                tgt.slowest_new = max(tgt.slowest_new, now - started)
        except Exception as exc:  # pylint: disable=broad-except
            tgt.failed("new", time.monotonic(), t0, f"{type(exc).__name__}: {exc}")
        stop.wait(max(0.0, every - (time.monotonic() - started)))


def _long_lived(tgt, cfg, stop, t0):
    spec, sock, n = tgt.spec, None, 0
    probe = PROTOCOLS[spec.get("protocol", "echo")]
    while not stop.is_set():
        n += 1
        try:
            if sock is None:
                sock = socket.create_connection((spec["ip"], spec["port"]),
                                                timeout=cfg["timeout"])
                sock.settimeout(cfg["timeout"])
                probe.open(sock, spec)
            probe.request(sock, n, spec)
            tgt.ok("long", time.monotonic())
        except Exception as exc:  # pylint: disable=broad-except
            tgt.failed("long", time.monotonic(), t0, f"{type(exc).__name__}: {exc}")
            if sock is not None:
                sock.close()
            sock = None
            stop.wait(0.2)
            continue
        stop.wait(cfg["long_interval"])
    if sock is not None:
        sock.close()


def _leader(samples, stop):
    """Every second: (time, the leader's address, "" for none, or None when the local agent
    did not answer)."""
    while not stop.is_set():
        try:
            with urllib.request.urlopen("http://127.0.0.1:8500/v1/status/leader",
                                        timeout=1) as res:
                leader = json.loads(res.read() or b'""')
        except urllib.error.HTTPError as exc:
            # "No cluster leader": none; "No known Consul servers": an agent not joined yet
            leader = "" if b"leader" in exc.read().lower() else None
        except Exception:  # pylint: disable=broad-except
            leader = None
        samples.append((round(time.monotonic(), 2), leader))
        stop.wait(1.0)


def leader_changes(samples):
    """How many times the leader named by one agent's samples changed (an election seen by
    that agent); samples without a leader or without an answer do not count.

    >>> leader_changes([(0, "a"), (1, ""), (2, None), (3, "a"), (4, "b"), (5, "b")])
    1
    """
    named = [leader for _, leader in samples if leader]
    return sum(1 for prev, cur in zip(named, named[1:]) if cur != prev)


def run_client(config_path):
    """The in-node client: runs until ``<dir>/stop`` exists or ``max_seconds`` pass, then
    writes ``<dir>/report.json``."""
    with open(config_path, encoding="utf-8") as fh:
        cfg = json.load(fh)
    stop, t0 = threading.Event(), time.monotonic()
    targets = [_Target(spec) for spec in cfg["targets"]]
    samples = []
    threads = [threading.Thread(target=_leader, args=(samples, stop), daemon=True)]
    for i, tgt in enumerate(targets):
        threads.append(threading.Thread(target=_new_connections,
                                        args=(tgt, cfg, stop, t0, i * cfg["interval"]),
                                        daemon=True))
        threads.append(threading.Thread(target=_long_lived, args=(tgt, cfg, stop, t0),
                                        daemon=True))
    for thread in threads:
        thread.start()
    stop_file = os.path.join(cfg["dir"], "stop")
    while not os.path.exists(stop_file) and time.monotonic() - t0 < cfg["max_seconds"]:
        time.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join(timeout=cfg["timeout"] + 2)
    now = time.monotonic()
    no_leader = [t for t, leader in samples if leader == ""]
    no_agent = [t for t, leader in samples if leader is None]
    report = {"seconds": round(now - t0, 1), "targets": [t.report(now) for t in targets],
              "leader_samples": len(samples), "no_leader_samples": len(no_leader),
              "no_leader_at": [round(t - t0, 1) for t in no_leader][:50],
              "agent_down_samples": len(no_agent),
              "leader_changes": leader_changes(samples)}
    tmp = os.path.join(cfg["dir"], "report.json.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(report, fh)
    os.replace(tmp, os.path.join(cfg["dir"], "report.json"))


# ---------------------------------------------------------------------------------------------
# the host side
def _planner():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "_utils"))
    import apigee_mtls_plan  # pylint: disable=import-outside-toplevel

    return apigee_mtls_plan


#: (component, client port) -> the protocol a lab with real datastores is probed with
REAL_PROTOCOLS = {"zookeeper": (2181, "zookeeper"), "postgres": (5432, "postgres"),
                  "openldap": (10389, "ldap")}


def targets_for(pillar, node_id, real=False):
    """One target per (remote node, destination component) the node may reach: the
    component's first meshed port there, at the real address (redirected into the mesh).
    ``real``: the lab runs the real datastores (``--components real``); their targets are
    their client ports, probed in their own protocol (:data:`REAL_PROTOCOLS`)."""
    planner = _planner()
    seen, out = set(), []
    for up in planner.plan(pillar, node_id)["upstreams"]:
        key = (up["node"], up["component"])
        port, protocol = up["component_port"], "echo"
        if real and up["component"] in REAL_PROTOCOLS:
            port, protocol = REAL_PROTOCOLS[up["component"]]
            if up["component_port"] != port:
                continue
        if key in seen:
            continue
        seen.add(key)
        out.append({"node": up["node"], "component": up["component"], "ip": up["ip"],
                    "port": port, "protocol": protocol})
    return out


def split_flows(upstreams, real_ports=None):
    """Split a node's upstreams for a one-shot check of each flow.

    :param list upstreams: the planner's ``upstreams`` of a node (dicts with ``node``,
        ``component``, ``ip``, ``component_port``)
    :param dict real_ports: on a lab with real datastores, ``{component: [ports]}`` their
        programs serve (``lab/real.py``'s ``REAL_PORTS``); None on a stand-in lab
    :returns: ``(echo, probed)``: the upstreams a stand-in answers (a line out, its identity
        back), and target specs for the real datastores' client ports, to be used in their
        own protocols (:func:`probe`). The real datastores' other ports (ZooKeeper's quorum
        ports) are in neither: they carry the ensemble itself, and a server that answers
        ``srvr`` on its client port has its quorum.
    """
    echo, probed = [], []
    for up in upstreams:
        if up["component_port"] not in (real_ports or {}).get(up["component"], []):
            echo.append(up)
        elif up["component_port"] == REAL_PROTOCOLS[up["component"]][0]:
            probed.append({"node": up["node"], "component": up["component"], "ip": up["ip"],
                           "port": up["component_port"],
                           "protocol": REAL_PROTOCOLS[up["component"]][1]})
    return echo, probed


class Traffic:
    """Clients on every node of a lab (``tests/lab/conftest.py``'s ``Lab``).

    :param lab: the lab
    :param pillar: the ``apigee_mtls`` pillar the targets come from (default: the lab's)
    :param nodes: the nodes that run a client (default: every node)
    :param interval: seconds between two new connections of a node (targets in turn)
    :param long_interval: seconds between two requests on a long-lived connection
    :param max_seconds: the clients stop by themselves after this long
    :param real: probe the real datastores in their protocols (default: the lab's
        ``components`` is ``real``)
    """

    def __init__(self, lab, pillar=None, nodes=None, interval=INTERVAL, long_interval=1.0,
                 max_seconds=900, timeout=5.0, real=None):
        self.lab = lab
        if real is None:
            real = getattr(lab, "components", "standin") == "real"
        self.nodes = list(nodes or lab.nodes)
        self.cfg = {"interval": interval, "long_interval": long_interval,
                    "max_seconds": max_seconds, "timeout": timeout, "dir": NODE_DIR}
        self.targets = {n: targets_for(pillar or lab.pillar, n, real) for n in self.nodes}

    def start(self, settle=3.0):
        """Start the clients; wait ``settle`` seconds so every target has been used."""
        with open(os.path.abspath(__file__), encoding="utf-8") as fh:
            code = fh.read()
        # a unit name of its own per run: the previous run's unit may still be unloading
        self.unit = f"{UNIT}-{int(time.time() * 1000)}"
        for node in self.nodes:
            cfg = dict(self.cfg, targets=self.targets[node])
            # a client left running by an interrupted run would write its report here too
            self.lab.run(node, f"systemctl stop '{UNIT}-*' 2>/dev/null; "
                               f"rm -rf {NODE_DIR} && mkdir -p {NODE_DIR}", check=False)
            self.lab.run(node, ["sh", "-c", f"cat > {NODE_DIR}/traffic.py"], input=code)
            self.lab.run(node, ["sh", "-c", f"cat > {NODE_DIR}/config.json"],
                         input=json.dumps(cfg))
            self.lab.run(node, ["systemd-run", "--quiet", f"--unit={self.unit}", "--collect",
                                "python3", f"{NODE_DIR}/traffic.py", f"{NODE_DIR}/config.json"])
        time.sleep(settle)

    def stop(self, timeout=30):
        """Stop the clients and return ``{"totals": {...}, "nodes": {node: report}}``."""
        for node in self.nodes:
            self.lab.run(node, ["touch", f"{NODE_DIR}/stop"], check=False)
        reports, deadline = {}, time.monotonic() + timeout
        while len(reports) < len(self.nodes) and time.monotonic() < deadline:
            for node in self.nodes:
                if node in reports:
                    continue
                out = self.lab.run(node, ["cat", f"{NODE_DIR}/report.json"], check=False)
                if out.returncode == 0 and out.stdout.strip():
                    reports[node] = json.loads(out.stdout)
            time.sleep(0.5)
        missing = [n for n in self.nodes if n not in reports]
        return {"totals": summarize(reports, missing), "nodes": reports}


def summarize(reports, missing=()):
    """Totals over the nodes' reports: new connections made and failed, long-lived requests
    and broken connections, the longest gap of any target, samples without a leader and
    without an answer from the local agent, the leader changes (elections) the agents saw,
    the failed flows (``"<src> -> <dst> <component>"``), the new connections each failed
    (``new_failed_flows``), and a few failures of each flow and kind (when, in seconds from the
    start, and the error): the new connections' first, so that many broken long-lived
    connections do not crowd out the few new ones that failed."""
    tot = {"new_ok": 0, "new_failed": 0, "long_ok": 0, "long_broken": 0, "max_gap": 0.0,
           "slowest_new": 0.0,
           "leader_samples": 0, "no_leader_samples": 0, "agent_down_samples": 0,
           "leader_changes": 0, "failed_flows": [], "new_failed_flows": {},
           "failure_samples": [], "missing_reports": list(missing)}
    samples = {"new": [], "long": []}
    for node, rep in sorted(reports.items()):
        tot["leader_samples"] += rep["leader_samples"]
        tot["no_leader_samples"] += rep["no_leader_samples"]
        tot["agent_down_samples"] += rep.get("agent_down_samples", 0)
        # elections: the most any one agent saw (each agent sees the same ones)
        tot["leader_changes"] = max(tot["leader_changes"], rep.get("leader_changes", 0))
        for tgt in rep["targets"]:
            for key in ("new_ok", "new_failed", "long_ok", "long_broken"):
                tot[key] += tgt[key]
            tot["max_gap"] = max(tot["max_gap"], tgt["max_gap"])
            tot["slowest_new"] = max(tot["slowest_new"], tgt.get("slowest_new", 0.0))
            if tgt["new_failed"] or tgt["long_broken"]:
                dst = tgt["target"]
                flow = f"{node} -> {dst['node']} {dst['component']}"
                tot["failed_flows"].append(flow)
                if tgt["new_failed"]:
                    tot["new_failed_flows"][flow] = tgt["new_failed"]
                for kind in samples:
                    samples[kind] += [f"{flow} at {when}s ({k}): {error}" for when, k, error
                                      in tgt.get("failures", []) if k == kind][:2]
    tot["failure_samples"] = (samples["new"] + samples["long"])[:12]
    tot["max_gap"] = round(tot["max_gap"], 2)
    tot["slowest_new"] = round(tot["slowest_new"], 2)
    return tot


if __name__ == "__main__":
    run_client(sys.argv[1])
