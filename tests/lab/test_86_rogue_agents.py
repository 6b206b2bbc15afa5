"""Attacks on the cluster's membership, from a member node (n5: its IP passes the other
nodes' firewall, as an intruder on a cluster host would): a second, rogue Consul agent is
started there, next to the real one, and tries to join.

- with a wrong gossip key: it never becomes a member;
- with the right gossip key (stolen) but no agent certificate, or a certificate from another
  CA: Consul 1.8 gossip has no TLS, so it can appear in the member list, but every RPC is
  refused by the servers (verify_incoming): it cannot read the catalog, register a service or
  obtain a mesh certificate.
"""
import base64
import json
import os
import time

import pytest

NODE = "n5"
PY = "/opt/salt/bin/python3"  # the salt venv's python: it has cryptography

START = r"""
set -e
d=/tmp/rogue-$1; rm -rf $d; mkdir -p $d/data
cat > $d/config.json
nohup /usr/local/bin/consul agent -config-file=$d/config.json > $d/log 2>&1 &
echo $! > $d/pid
"""

# a CA and an agent certificate that look right (client.dc-1.consul) but are not the cluster's
OTHER_CA = r"""
import datetime, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
d = sys.argv[1]
now = datetime.datetime.now(datetime.timezone.utc)
def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
ca_key = ec.generate_private_key(ec.SECP256R1())
ca = (x509.CertificateBuilder().subject_name(name("apigee_mtls cluster CA"))
      .issuer_name(name("apigee_mtls cluster CA")).public_key(ca_key.public_key())
      .serial_number(x509.random_serial_number()).not_valid_before(now)
      .not_valid_after(now + datetime.timedelta(days=1))
      .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
      .sign(ca_key, hashes.SHA256()))
key = ec.generate_private_key(ec.SECP256R1())
cert = (x509.CertificateBuilder().subject_name(name("rogue")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("client.dc-1.consul"), x509.DNSName("server.dc-1.consul")]),
            critical=False)
        .sign(ca_key, hashes.SHA256()))
open(d + "/ca.pem", "wb").write(ca.public_bytes(serialization.Encoding.PEM))
open(d + "/agent.pem", "wb").write(cert.public_bytes(serialization.Encoding.PEM))
open(d + "/agent-key.pem", "wb").write(key.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
    serialization.NoEncryption()))
"""

HTTP = r"""
import json, sys, urllib.request, urllib.error
port, method, path = sys.argv[1], sys.argv[2], sys.argv[3]
req = urllib.request.Request("http://127.0.0.1:%s%s" % (port, path), method=method,
                             data=(sys.argv[4].encode() if len(sys.argv) > 4 else None))
try:
    with urllib.request.urlopen(req, timeout=10) as r:
        print(json.dumps({"status": r.status, "body": r.read().decode()[:20000]}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "body": e.read().decode()[:300]}))
except Exception as e:
    print(json.dumps({"status": None, "body": str(e)[:300]}))
"""


def _config(lab, name, http_port, gossip_key, tls_dir=None):
    cfg = {
        "node_name": f"rogue-{name}", "datacenter": "dc-1", "server": False,
        "data_dir": f"/tmp/rogue-{name}/data", "bind_addr": lab.ip[NODE],
        "client_addr": "127.0.0.1", "encrypt": gossip_key,
        "retry_join": [lab.ip[n] + ":8301" for n in lab.nodes
                       if "zookeeper" in next(x for x in lab.model["nodes"]
                                              if x["id"] == n)["components"]],
        "retry_interval": "2s", "log_level": "DEBUG",
        "ports": {"http": http_port, "https": -1, "grpc": -1, "dns": -1,
                  "serf_lan": http_port - 200, "serf_wan": -1, "server": http_port - 100},
    }
    if tls_dir:
        cfg.update({"ca_file": f"{tls_dir}/ca.pem", "cert_file": f"{tls_dir}/agent.pem",
                    "key_file": f"{tls_dir}/agent-key.pem", "verify_outgoing": True,
                    "verify_server_hostname": True})
    return json.dumps(cfg)


def _http(lab, port, method, path, body=None):
    argv = [PY, "-c", HTTP, str(port), method, path] + ([body] if body else [])
    return json.loads(lab.run(NODE, argv).stdout)


def _members_seen_by_servers(lab):
    out = set()
    for node in lab.nodes[:1]:
        ret = lab.py(node, "import json,urllib.request;print(json.dumps([m['Name'] for m in "
                           "json.loads(urllib.request.urlopen('http://127.0.0.1:8500/v1/agent/"
                           "members').read()) if m['Status'] == 1]))")
        out |= set(ret)
    return out


@pytest.fixture
def rogue(applied):
    lab = applied
    started = []

    def start(name, http_port, gossip_key, tls_dir=None):
        lab.run(NODE, ["sh", "-c", START, "start", name],
                input=_config(lab, name, http_port, gossip_key, tls_dir))
        started.append(name)
        return http_port

    yield start
    for name in started:
        lab.run(NODE, f"kill $(cat /tmp/rogue-{name}/pid) 2>/dev/null; sleep 1; "
                      f"rm -rf /tmp/rogue-{name}", check=False)
        lab.run(lab.model["tls"]["signer"], f"consul force-leave rogue-{name}", check=False)


def test_rogue_agent_with_a_wrong_gossip_key_never_joins(applied, rogue):
    lab = applied
    wrong = base64.b64encode(os.urandom(32)).decode()
    port = rogue("wrongkey", 18510, wrong)
    time.sleep(12)  # several retry_join rounds (every 2 s)
    assert "rogue-wrongkey" not in _members_seen_by_servers(lab)
    seen = _http(lab, port, "GET", "/v1/agent/members")
    names = [m["Name"] for m in json.loads(seen["body"])] if seen["status"] == 200 else []
    assert names == ["rogue-wrongkey"], seen  # it only knows itself
    log = lab.run(NODE, "cat /tmp/rogue-wrongkey/log").stdout
    # it reached the servers' gossip port and was turned away for its key, not for anything else
    assert "No installed keys could decrypt the message" in log, log[-800:]


@pytest.mark.parametrize("variant", ["nocert", "otherca"])
def test_rogue_agent_with_the_gossip_key_but_no_valid_certificate_gets_no_rpc(
        applied, rogue, variant):
    lab = applied
    key = lab.pillar["secrets"]["gossip_key"]
    tls_dir = None
    if variant == "otherca":
        tls_dir = "/tmp/rogue-otherca-tls"
        lab.run(NODE, f"rm -rf {tls_dir}; mkdir -p {tls_dir}")
        lab.run(NODE, [PY, "-c", OTHER_CA, tls_dir])
    port = rogue(variant, 18520 if variant == "nocert" else 18530, key, tls_dir)
    try:
        time.sleep(12)
        # the rogue agent runs (its local API answers, no RPC needed)...
        me = _http(lab, port, "GET", "/v1/agent/self")
        assert me["status"] == 200 and f"rogue-{variant}" in me["body"], me
        # ...but every RPC it tries is refused by the servers
        # (it joined the gossip with the key and knows the servers: "rpc error", not "No known
        # Consul servers", proves the servers themselves refused it)
        deadline = time.monotonic() + 30
        while True:
            catalog = _http(lab, port, "GET", "/v1/catalog/nodes")
            if "rpc error" in catalog["body"] or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert catalog["status"] == 500 and "rpc error" in catalog["body"], catalog
        service = json.dumps({"Name": "rt-8081-" + lab.ip["n2"].replace(".", "-"), "Port": 1})
        _http(lab, port, "PUT", "/v1/agent/service/register", service)
        leaf = _http(lab, port, "GET", "/v1/agent/connect/ca/leaf/rt-8081-"
                     + lab.ip["n2"].replace(".", "-"))
        assert leaf["status"] != 200 or "CertPEM" not in leaf["body"], leaf
        time.sleep(3)
        # the service it tried to register under n2's name is not in the catalog
        nodes = lab.py("n1", "import json,urllib.request;print(json.dumps([s['Node'] for s in "
                             "json.loads(urllib.request.urlopen('http://127.0.0.1:8500/v1/catalog/"
                             "service/rt-8081-" + lab.ip["n2"].replace(".", "-") + "').read())]))")
        assert nodes == ["n2"], nodes
        log = lab.run(NODE, f"cat /tmp/rogue-{variant}/log").stdout
        assert "RPC failed to server" in log, log[-800:]
    finally:
        if tls_dir:
            lab.run(NODE, f"rm -rf {tls_dir}", check=False)
