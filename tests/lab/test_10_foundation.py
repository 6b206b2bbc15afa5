"""Foundation, proven on the lab: a TLS- and gossip-secured Consul cluster rolled out by
``salt '*' state.apply apigee_mtls``; test mode previews and changes nothing; reruns are no-ops;
the CA key exists only on the signer."""
import hashlib
import json
import os

import pytest
import yaml

from conftest import REPO, REUSE, labctl, state_summary


@pytest.mark.skipif(REUSE, reason="LAB_REUSE=1: no fresh nodes to preview on")
def test_test_mode_on_fresh_nodes_previews_and_changes_nothing(lab):
    summary = state_summary(lab.test_mode_return)
    assert set(summary) == set(lab.nodes)
    for node, s in summary.items():
        assert not s["failed"], f"{node}: test=True failed: {s['failed']}"
        assert len(s["changed"]) >= 10, f"{node}: test=True previews too little: {s['changed']}"
        # the preview names what would be done, with result None
        states = lab.test_mode_return[node]
        assert any(st["result"] is None for st in states.values())
        assert lab.after_test_mode_fingerprints[node] == lab.fresh_fingerprints[node], (
            f"{node}: test=True changed the node")
        # the IPv6 chains are previewed exactly: both created, both jumps, nothing done
        chains = next(st for st in states.values()
                      if st["__id__"] == "apigee-mtls-firewall-chains-managed")
        assert chains["result"] is None and chains["comment"].startswith("Would"), chains
        for chain, parent in (("APIGEE-MTLS-IN", "INPUT"), ("APIGEE-MTLS-OUT", "OUTPUT")):
            assert chains["changes"]["ip6:" + chain]["chain"] == "create", chains
            assert chains["changes"]["ip6:" + chain]["jump"] == f"{parent} -> {chain}"
        rules6 = next(st for st in states.values()
                      if st["__id__"] == "apigee-mtls-firewall-rules6-managed")
        assert rules6["result"] is None, rules6
    signer = lab.model["tls"]["signer"]
    ids = {st["__id__"] for st in lab.test_mode_return[signer].values()}
    assert "apigee-mtls-tls-ca-key-managed" in ids and "apigee-mtls-intentions-managed" in ids


def test_first_apply_succeeds_everywhere(applied):
    summary = state_summary(applied.first_apply)
    for node in applied.nodes:
        assert summary[node]["total"] > 10
        assert summary[node]["changed"], f"{node}: first apply changed nothing"
    # ... on a stock master: Salt's default workers (no worker_threads, no worker_pools), no
    # peer publish; the nodes asked the signer through the event bus and the reactor
    with open(os.path.join(labctl.SALT_CONF, "master"), encoding="utf-8") as fh:
        master = yaml.safe_load(fh)
    if not os.environ.get("LAB_MASTER_WORKERS"):
        assert not {"worker_threads", "worker_pools", "peer"} & set(master), master
    assert master["reactor"] == [
        {"apigee_mtls/request": ["salt://apigee_mtls/reactor/request.sls"]},
        {"apigee_mtls/answer": ["salt://apigee_mtls/reactor/answer.sls"]}]
    log = os.path.join(labctl.STATE, "master", "var", "log", "salt", "master")
    with open(log, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    assert "Published command apigee_mtls.answer_request" in text
    assert "SaltReqTimeoutError" not in text, "the master timed out on a request"


def _members(lab, node):
    out = lab.run(node, "consul members -detailed").stdout.strip().splitlines()[1:]
    rows = [line.split() for line in out]
    return {r[0]: {"address": r[1], "status": r[2], "tags": r[3]} for r in rows}


def test_cluster_members_servers_and_clients(applied):
    lab = applied
    servers = {n["id"] for n in lab.model["nodes"]
               if "zookeeper" in n["components"] and not n.get("retired")}
    for node in lab.nodes:
        members = _members(lab, node)
        assert set(members) == set(lab.nodes), f"{node} sees {sorted(members)}"
        assert all(m["status"] == "alive" for m in members.values())
        roles = {name: ("role=consul" in m["tags"]) for name, m in members.items()}
        assert {n for n, is_server in roles.items() if is_server} == servers
    assert len(servers) == 3 and len(set(lab.nodes) - servers) == 2


def test_exactly_one_leader_all_agree(applied):
    lab = applied
    leaders = set()
    for node in lab.nodes:
        leaders.add(lab.run(node, "python3 -c \"import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:8500/v1/status/leader').read().decode())\"").stdout.strip())
    assert len(leaders) == 1 and leaders != {'""'}, leaders
    peers = lab.run(lab.model["tls"]["signer"], "CONSUL_HTTP_TOKEN_FILE=/etc/consul.d/acl/management.token consul operator raft list-peers").stdout
    rows = [l.split() for l in peers.strip().splitlines()[1:]]
    assert len(rows) == 3
    assert sum(1 for r in rows if "leader" in r) == 1
    assert all("true" in r for r in rows), peers  # all voters


def test_gossip_is_encrypted(applied):
    for node in applied.nodes:
        info = applied.run(node, "consul info").stdout
        assert "encrypted = true" in info, f"{node}: gossip not encrypted"


def test_agent_tls_is_enforced(applied):
    """verify_incoming: an RPC/HTTPS client without a certificate from the cluster CA is
    refused; with the node's own certificate it is served."""
    lab = applied
    server = lab.model["tls"]["signer"]
    client_node = [n for n in lab.nodes if n != server][-1]
    ip = lab.ip[server]
    code = f"""
import json, socket, ssl
res = {{}}
# 1. RPC port, plaintext RPC (first byte 0x01 = consul RPC): must be refused
s = socket.create_connection(({ip!r}, 8300), timeout=5)
s.sendall(b"\\x01")
try:
    s.settimeout(3); data = s.recv(1)
    res["plain_rpc"] = "closed" if data == b"" else "answered"
except Exception as exc:
    res["plain_rpc"] = "closed:" + type(exc).__name__
# 2. RPC port, TLS (0x03) without a client certificate: handshake must fail
def tls_try(cert):
    ctx = ssl.create_default_context(cafile="/etc/consul.d/tls/ca.pem")
    ctx.check_hostname = False
    if cert:
        ctx.load_cert_chain("/etc/consul.d/tls/agent.pem", "/etc/consul.d/tls/agent-key.pem")
    s = socket.create_connection(({ip!r}, 8300), timeout=5)
    s.sendall(b"\\x03")
    try:
        t = ctx.wrap_socket(s, server_hostname="server.dc-1.consul")
        t.settimeout(3)
        t.sendall(b"\\x00")  # provoke the server to check our (missing) cert
        try:
            t.recv(1)
        except socket.timeout:
            pass
        return "accepted"
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        return "refused:" + type(exc).__name__
res["tls_rpc_no_cert"] = tls_try(False)
res["tls_rpc_with_cert"] = tls_try(True)
# 3. HTTPS API with and without client certificate
import urllib.request
def https(cert):
    ctx = ssl.create_default_context(cafile="/etc/consul.d/tls/ca.pem")
    ctx.check_hostname = False
    if cert:
        ctx.load_cert_chain("/etc/consul.d/tls/agent.pem", "/etc/consul.d/tls/agent-key.pem")
    try:
        return urllib.request.urlopen("https://{ip}:8501/v1/status/leader", context=ctx, timeout=5).status
    except Exception as exc:
        return "refused:" + type(exc).__name__
res["https_no_cert"] = https(False)
res["https_with_cert"] = https(True)
print(json.dumps(res))
"""
    res = lab.py(client_node, code)
    assert res["plain_rpc"].startswith("closed"), res
    assert res["tls_rpc_no_cert"].startswith("refused"), res
    assert res["tls_rpc_with_cert"] == "accepted", res
    assert str(res["https_no_cert"]).startswith("refused"), res
    assert res["https_with_cert"] == 200, res


def test_ca_private_key_only_on_signer_and_key_modes(applied):
    lab = applied
    signer = lab.model["tls"]["signer"]
    for node in lab.nodes:
        found = lab.run(node, "find / -xdev -name 'ca-key.pem' 2>/dev/null", check=False).stdout.split()
        if node == signer:
            assert found == ["/etc/apigee-mtls/ca/ca-key.pem"], found
            st = lab.run(node, "stat -c '%a %U' /etc/apigee-mtls/ca/ca-key.pem").stdout.split()
            assert st == ["600", "root"]
        else:
            assert found == [], f"{node} holds a CA key: {found}"
        st = lab.run(node, "stat -c '%a %U' /etc/consul.d/tls/agent-key.pem").stdout.split()
        assert st == ["600", "consul"], f"{node}: agent key {st}"
        st = lab.run(node, "stat -c '%a %U %G' /etc/consul.d/encrypt.json").stdout.split()
        assert st == ["640", "root", "consul"], f"{node}: encrypt.json {st}"


def test_agent_certificate_identity(applied):
    """Each node's certificate carries its own identity; only servers get server.<dc>.consul."""
    lab = applied
    for node in lab.nodes:
        info = lab.py(node, """
import json
from cryptography import x509
c = x509.load_pem_x509_certificate(open('/etc/consul.d/tls/agent.pem','rb').read())
san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
print(json.dumps({"dns": sorted(san.get_values_for_type(x509.DNSName)),
                  "ip": sorted(str(i) for i in san.get_values_for_type(x509.IPAddress)),
                  "cn": c.subject.rfc4514_string()}))
""", python="/opt/salt/bin/python3")
        is_server = "zookeeper" in next(n for n in lab.model["nodes"] if n["id"] == node)["components"]
        assert ("server.dc-1.consul" in info["dns"]) == is_server, (node, info)
        assert "client.dc-1.consul" in info["dns"] and lab.ip[node] in info["ip"]


def test_rerun_reports_zero_changes(applied):
    ret = applied.apply()
    summary = state_summary(ret)
    for node in applied.nodes:
        assert not summary[node]["failed"], summary[node]
        assert summary[node]["changed"] == [], f"{node}: rerun changed {summary[node]['changed']}"
        # IPv6 was compared, not skipped (the lab's nodes are dual-stack)
        chains = next(st for st in ret[node].values()
                      if st["__id__"] == "apigee-mtls-firewall-chains-managed")
        assert chains["comment"] == "Firewall chains match the plan", chains


def test_no_secret_in_state_returns(applied):
    gossip = applied.pillar["secrets"]["gossip_key"]
    assert gossip not in json.dumps(applied.first_apply)
    if applied.test_mode_return is not None:
        assert gossip not in json.dumps(applied.test_mode_return)


def test_the_master_serves_the_formula_from_one_root_in_salts_layout(applied):
    """Issue 13: the lab's master serves the formula as README's installation does: one file
    root holding `apigee_mtls/` next to `_modules/`, `_states/`, `_utils/` (what the
    `salt-formula` branch and the SPM package hold, tools/dist.py), no copies or links in
    another root; the minions' synced modules are the repository's."""
    lab = applied
    with open(os.path.join(labctl.SALT_CONF, "master"), encoding="utf-8") as fh:
        roots = yaml.safe_load(fh)["file_roots"]["base"]
    assert roots[0] == labctl.FORMULA_ROOT
    served = sorted(os.path.relpath(os.path.join(r, n), labctl.FORMULA_ROOT)
                    for r, _, names in os.walk(labctl.FORMULA_ROOT) for n in names)
    assert served == sorted(labctl.dist.files())
    for other in roots[1:]:
        assert not [n for n in os.listdir(other) if n.startswith("_") or n == "apigee_mtls"]
    node = lab.nodes[-1]
    listed = lab.salt(node, "cp.list_master")[node]
    for path in ("apigee_mtls/init.sls", "apigee_mtls/map.jinja", "_modules/apigee_mtls.py",
                 "_states/apigee_mtls.py", "_utils/apigee_mtls_plan.py"):
        assert path in listed, path
    assert not [p for p in listed if p.startswith(("formula/", "tests/", "lab/", "bench/"))]
    for kind, path in (("modules", "_modules/apigee_mtls.py"),
                       ("states", "_states/apigee_mtls.py"),
                       ("utils", "_utils/apigee_mtls_plan.py")):
        with open(os.path.join(REPO, path), "rb") as fh:
            want = hashlib.sha256(fh.read()).hexdigest()
        out = lab.run(node, f"sha256sum /var/cache/salt/minion/extmods/{kind}/"
                            f"{os.path.basename(path)}").stdout.split()
        assert out and out[0] == want, (path, out)
