"""The rendered Envoy configuration, run (_utils/apigee_mtls_envoy.py; the Envoy data plane,
docs/design-envoy.md): two real Envoys on this host's loopback, n4's (egress) and n1's
(ingress) of the 5-node topology, their node IPs moved to 127.0.77.x, with certificates of a
test CA carrying Consul's SPIFFE IDs. No lab, no Consul: what is proven is the rendering, that
Envoy runs it, and what Envoy then does on a flow the intentions allow (n4 -> n1's
ZooKeeper 2181):

- a half-closing probe (``ruok``, ``shutdown(SHUT_WR)``) is answered 20 times out of 20;
- a component that opens its port 1 s late is reached (the ingress retries its dial);
- an identity the intentions do not allow is refused by the ingress.
"""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from test_envoy_config import TRUST_DOMAIN, _certs, _envoy_binary, _pillar

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "_utils"))

import apigee_mtls_envoy as envoy  # noqa: E402  pylint: disable=wrong-import-position
import apigee_mtls_plan as planner  # noqa: E402  pylint: disable=wrong-import-position


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _loopback(doc, ips):
    """``doc`` with each node IP replaced by a loopback address of its own."""
    text = json.dumps(doc)
    for ip, lo in ips.items():
        text = text.replace(f'"{ip}"', f'"{lo}"')
    return json.loads(text)


class _Ruok:
    """A four-letter-word server: reads to the client's half-close, answers ``imok``."""

    def __init__(self, port, delay=0.0):
        self.port, self.stop = port, threading.Event()
        self.thread = threading.Thread(target=self._run, args=(delay,), daemon=True)
        self.thread.start()

    def _run(self, delay):
        time.sleep(delay)
        with socket.socket() as srv:
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind(("127.0.0.1", self.port))
            srv.listen(16)
            srv.settimeout(0.1)
            while not self.stop.is_set():
                try:
                    conn, _ = srv.accept()
                except socket.timeout:
                    continue
                with conn:
                    buf = b""
                    while chunk := conn.recv(64):
                        buf += chunk
                    conn.sendall(b"imok" if buf == b"ruok" else b"?")

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)


def _ruok(address, port):
    try:
        with socket.create_connection((address, port), timeout=20) as conn:
            conn.settimeout(20)
            conn.sendall(b"ruok")
            conn.shutdown(socket.SHUT_WR)
            buf = b""
            while chunk := conn.recv(64):
                buf += chunk
            return buf.decode(errors="replace")
    except OSError as exc:
        return type(exc).__name__


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """n1's and n4's Envoys running the rendered configuration, plus a rogue egress (an
    identity no intention allows) to the same upstream; yields what the tests need."""
    pillar = _pillar()
    ips = {n["ip"]: f"127.0.77.{n['ip'].rsplit('.', 1)[1]}" for n in pillar["nodes"]}
    intentions = planner.intentions(pillar)
    plans = {n: planner.plan(pillar, n) for n in ("n1", "n4")}
    upstream = next(u for u in plans["n4"]["upstreams"] if u["service"] == "zk-2181-10-77-0-11")
    service = next(s for s in plans["n1"]["services"] if s["name"] == upstream["service"])
    app_port = _free_port()
    tmp = tmp_path_factory.mktemp("envoy")
    certs = tmp / "certs"
    certs.mkdir()
    names = [service["name"], plans["n4"]["egress"]["identity"], "egress-rogue"]
    _certs(certs, names)
    for file_name, doc in envoy.secrets(str(certs), names).items():
        (certs / file_name).write_text(json.dumps(doc))
    listener, cluster = envoy.ingress_resources(
        service, envoy.allowed_sources(intentions, service["name"]), TRUST_DOMAIN, str(certs))
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"]["port_value"] = app_port
    configs = {"n1": {"listeners": [listener], "clusters": [cluster]},
               "n4": dict(zip(("listeners", "clusters"), map(list, zip(*[
                   envoy.egress_resources(upstream, plans["n4"]["egress"]["identity"],
                                          TRUST_DOMAIN, str(certs))]))))}
    rogue_up = dict(upstream, local_bind_address="127.0.78.1")
    configs["rogue"] = dict(zip(("listeners", "clusters"), map(list, zip(*[
        envoy.egress_resources(rogue_up, "egress-rogue", TRUST_DOMAIN, str(certs))]))))
    procs = []
    try:
        for i, (name, out) in enumerate(configs.items()):
            directory = tmp / name
            directory.mkdir()
            for file_name, doc in envoy.documents(out).items():
                (directory / file_name).write_text(json.dumps(_loopback(doc, ips)))
            boot = directory / "bootstrap.json"
            boot.write_text(json.dumps(envoy.bootstrap(name, name, str(directory),
                                                       admin_port=_free_port())))
            procs.append(subprocess.Popen(
                [_envoy_binary(), "-c", str(boot), "--concurrency", "1", "-l", "error",
                 "--base-id", str(os.getpid() % 1000 * 10 + i)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        listening = [(ips[upstream["ip"]], upstream["proxy_port"]),
                     (upstream["local_bind_address"], upstream["proxy_port"]),
                     ("127.0.78.1", upstream["proxy_port"])]
        deadline = time.monotonic() + 30
        while listening and time.monotonic() < deadline:
            try:
                socket.create_connection(listening[0], timeout=1).close()
                listening.pop(0)
            except OSError:
                time.sleep(0.2)
        assert not listening, ("Envoy never listened", listening,
                               [p.stderr.read1(4000) if p.poll() is not None else "running"
                                for p in procs])
        yield {"egress": (upstream["local_bind_address"], upstream["proxy_port"]),
               "rogue": ("127.0.78.1", upstream["proxy_port"]), "app_port": app_port}
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


def test_a_half_close_is_answered_through_the_rendered_mesh(mesh):
    app = _Ruok(mesh["app_port"])
    try:
        time.sleep(0.2)
        replies = [_ruok(*mesh["egress"]) for _ in range(20)]
        direct = [_ruok("127.0.0.1", mesh["app_port"]) for _ in range(20)]
    finally:
        app.close()
    assert direct.count("imok") == 20, direct
    assert replies.count("imok") == 20, replies


def test_a_component_that_opens_its_port_late_is_reached(mesh):
    app = _Ruok(mesh["app_port"], delay=1.0)
    try:
        began = time.monotonic()
        reply = _ruok(*mesh["egress"])
        took = time.monotonic() - began
    finally:
        app.close()
    assert reply == "imok" and took >= 0.9, (reply, took)


def test_an_identity_no_intention_allows_is_refused(mesh):
    app = _Ruok(mesh["app_port"])
    try:
        time.sleep(0.2)
        allowed, rogue = _ruok(*mesh["egress"]), _ruok(*mesh["rogue"])
    finally:
        app.close()
    assert allowed == "imok", allowed
    assert rogue != "imok", rogue
