"""Where a new mesh connection's time goes (run inside a lab node by bench/run.py, stdlib only).

Consul 1.8's built-in proxy does, for every new connection through an upstream:
  1. resolve: GET /v1/health/connect/<service>?passing&stale on the local agent (the
     ConsulResolver in connect/resolver.go: no agent cache), which a client agent forwards
     to a server as an RPC;
  2. TCP connect to the destination's sidecar, then the mTLS handshake, during which
  3. the destination sidecar asks its own agent POST /v1/agent/connect/authorize (intentions).
This script times each piece alone, p50/p99 over ``count`` calls. Argument: one JSON object
with ``mode`` (resolve | authorize | tcp | handshake) and its parameters; prints one JSON line.
The handshake uses Python's ssl (OpenSSL), not Go's crypto/tls: it shows the order of magnitude
of a full ECDSA mTLS handshake with Consul's leaf certificates, not the proxy's own figure.
"""
import json
import os
import socket
import ssl
import sys
import tempfile
import time
import urllib.request

AGENT = "http://127.0.0.1:8500"
# with ACLs on (the default), the node's own token: it may resolve upstreams, authorize
# inbound connections to its own services and get its own leaf certificates, as the sidecars do
TOKEN_FILE = "/etc/consul.d/acl/agent.token"


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))]


def summary(samples):
    us = [s * 1e6 for s in samples]
    return {"n": len(us), "p50_us": pct(us, 50), "p99_us": pct(us, 99)}


def get(path, data=None):
    req = urllib.request.Request(AGENT + path, data=data,
                                 method="POST" if data is not None else "GET")
    if os.path.exists(TOKEN_FILE):
        with open(TOKEN_FILE, encoding="utf-8") as fh:
            req.add_header("X-Consul-Token", fh.read().strip())
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read() or b"null")


def timed(fn, count, warmup=20):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(count):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main():
    a = json.loads(sys.argv[1])
    mode, count = a["mode"], int(a.get("count", 200))
    if mode == "resolve":
        path = f"/v1/health/connect/{a['service']}?passing=1&stale="

        def fn():
            assert get(path), "no healthy instance"
        res = summary(timed(fn, count))
    elif mode == "authorize":
        trust = get("/v1/agent/connect/ca/roots")["TrustDomain"]
        body = json.dumps({"Target": a["service"],
                           "ClientCertURI": f"spiffe://{trust}/ns/default/dc/{a['dc']}/svc/"
                                            f"{a['client_service']}",
                           "ClientCertSerial": "00"}).encode()

        def fn():
            assert get("/v1/agent/connect/authorize", body)["Authorized"], "not authorized"
        res = summary(timed(fn, count))
    elif mode == "tcp":
        def fn():
            socket.create_connection((a["host"], a["port"]), timeout=5).close()
        res = summary(timed(fn, count))
    elif mode == "handshake":
        leaf = get(f"/v1/agent/connect/ca/leaf/{a['client_service']}")
        roots = get("/v1/agent/connect/ca/roots")["Roots"]
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
            with open(cert, "w") as fh:
                fh.write(leaf["CertPEM"])
            with open(key, "w") as fh:
                fh.write(leaf["PrivateKeyPEM"])
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False  # Consul checks SPIFFE URIs, not host names
            ctx.load_verify_locations(cadata="\n".join(r["RootCert"] for r in roots))
            ctx.load_cert_chain(cert, key)

        def fn():
            raw = socket.create_connection((a["host"], a["port"]), timeout=5)
            tls = ctx.wrap_socket(raw)
            tls.close()
        res = summary(timed(fn, count))
        res["tls_version"] = None
        raw = socket.create_connection((a["host"], a["port"]), timeout=5)
        tls = ctx.wrap_socket(raw)
        res["tls_version"], res["cipher"] = tls.version(), tls.cipher()[0]
        tls.close()
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(res))


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # reported to bench/run.py as JSON, never a traceback
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
