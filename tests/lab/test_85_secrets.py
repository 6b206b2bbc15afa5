"""Secrets hygiene after every rollout the session did (first apply, reruns, Day-2 changes,
gossip rotation): the gossip key, the agent private keys, the CA private keys, the Consul ACL
tokens (every node's and the management token) and the organisation CA's key (the mesh root)
appear in no job cache, log, journal or `state.show_sls` output, on any minion or on the
master; every file holding a secret has the expected owner and mode."""
import json
import os
import subprocess

import pytest

from conftest import AGENT_TOKEN, MGMT_TOKEN, labctl


# the base64 body of a PEM private key, without its armour: what would leak if it leaked
KEY_BODY = r"""
import json, sys
lines = [l for l in open(sys.argv[1]).read().splitlines() if l and not l.startswith("-----")]
print(json.dumps("".join(lines)))
"""

# where a secret could end up on a minion besides its own file: Salt's caches and logs, the
# journal (every unit's output), and /tmp
HUNT = r"""
needle="$1"
grep -rlF -- "$needle" /var/cache/salt /var/log /tmp /root 2>/dev/null
journalctl --no-pager -o cat 2>/dev/null | grep -cF -- "$needle" | sed 's/^/journal matches: /' | grep -v ': 0$'
true
"""


def _key_bodies(lab):
    """{label: secret} for every private key the formula created, plus the gossip key; each
    key body also as its PEM lines (how a log would quote it), first line only."""
    out = {"gossip key": lab.pillar["secrets"]["gossip_key"]}
    for node in lab.nodes:
        body = lab.py(node, KEY_BODY.replace("sys.argv[1]", '"/etc/consul.d/tls/agent-key.pem"'))
        out[f"{node} agent key"] = body[:64]
    signer = lab.model["tls"]["signer"]
    # every CA generation's key (after test_75's rotation the signing one is ca-key-2.pem)
    ca_keys = lab.run(signer, "ls /etc/apigee-mtls/ca/ | grep key").stdout.split()
    assert ca_keys, "no CA key on the signer"
    for name in ca_keys:
        body = lab.py(signer, KEY_BODY.replace("sys.argv[1]", repr("/etc/apigee-mtls/ca/" + name)))
        out[f"CA key {name}"] = body[:64]
    for node in lab.nodes:
        token = lab.run(node, f"cat {AGENT_TOKEN}").stdout.strip()
        assert len(token) == 36, (node, "no ACL token")
        out[f"{node} ACL token"] = token
        local = lab.run(node, f"cat {AGENT_TOKEN.replace('agent.token', 'agent-master.token')}")
        assert len(local.stdout.strip()) == 36, (node, "no local agent master token")
        out[f"{node} agent master token"] = local.stdout.strip()
    out["management token"] = lab.run(signer, f"cat {MGMT_TOKEN}").stdout.strip()
    assert len(out["management token"]) == 36
    with open(os.path.join(labctl.STATE, "org-ca-key.pem"), encoding="utf-8") as fh:
        lines = [l for l in fh.read().splitlines() if l and not l.startswith("-----")]
    out["organisation CA key"] = "".join(lines)[:64]
    return out


@pytest.fixture(scope="module")
def secrets(applied):
    applied.wait_mesh_ready()
    return _key_bodies(applied)


def test_no_secret_in_any_minion_cache_log_or_journal(applied, secrets):
    lab = applied
    # control: the hunt does find what is there (a state ID in the minion's cached SLS files,
    # the minion's own name in its journal), so an empty result below means something
    control = lab.run(lab.nodes[0], ["sh", "-c", HUNT, "hunt",
                                     "apigee-mtls-config-agent-file-managed"]).stdout
    assert "/var/cache/salt/" in control, control
    journal = lab.run(lab.nodes[0], ["sh", "-c", HUNT, "hunt", "Started salt-minion"]).stdout
    assert "journal matches" in journal, journal
    found = {}
    for node in lab.nodes:
        for label, needle in secrets.items():
            hits = lab.run(node, ["sh", "-c", HUNT, "hunt", needle]).stdout.split()
            if hits:
                found[(node, label)] = hits
    assert not found, found


def test_no_secret_in_the_master_job_cache_or_log(applied, secrets):
    root = os.path.join(labctl.STATE, "master")
    jobs = os.path.join(root, "var", "cache", "salt", "master", "jobs")
    logs = os.path.join(root, "var", "log", "salt")
    assert os.path.isdir(jobs) and os.listdir(jobs), "no job cache: the test would prove nothing"
    found = {}
    for label, needle in secrets.items():
        hits = subprocess.run(["grep", "-rlF", "--", needle, jobs, logs], capture_output=True,
                              text=True, check=False).stdout.split()
        if hits:
            found[label] = hits
    assert not found, found


def test_show_sls_of_any_minion_shows_no_secret(applied, secrets):
    lab = applied
    ret = lab.salt("*", "state.show_sls", "apigee_mtls", timeout=300)
    assert set(ret) >= set(lab.nodes) and all(isinstance(ret[n], dict) for n in lab.nodes), ret
    text = json.dumps(ret)
    leaked = [label for label, needle in secrets.items() if needle in text]
    assert not leaked, leaked


MODES = r"""
import grp, json, os, pwd, stat, sys
out = {}
for path in sys.argv[1:]:
    for p in [path] + ([os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else []):
        st = os.stat(p)
        out[p] = [oct(stat.S_IMODE(st.st_mode)), pwd.getpwuid(st.st_uid).pw_name,
                  grp.getgrgid(st.st_gid).gr_name]
print(json.dumps(out))
"""


def test_every_file_holding_a_secret_has_its_owner_and_mode(applied):
    lab = applied
    signer = lab.model["tls"]["signer"]
    for node in lab.nodes:
        paths = ["/etc/consul.d/tls/agent-key.pem", "/etc/consul.d/encrypt.json",
                 "/var/lib/consul/serf", "/etc/consul.d/acl", "/etc/consul.d/acl-tokens.json",
                 "/etc/consul.d/apigee-mtls-services.json", "/etc/consul.d/acl-agent-master.json"]
        if node == signer:
            paths.append("/etc/apigee-mtls/ca")
        modes = lab.py(node, MODES.replace("sys.argv[1:]", repr(paths)))
        assert modes["/etc/consul.d/tls/agent-key.pem"] == ["0o600", "consul", "consul"], node
        assert modes["/etc/consul.d/encrypt.json"] == ["0o640", "root", "consul"], node
        # ACL tokens: the node's own (the sidecars run as consul too), read by nobody else;
        # the agent's copies in its config (acl-tokens.json, the service definitions)
        assert modes[AGENT_TOKEN] == ["0o600", "consul", "consul"], node
        assert modes["/etc/consul.d/acl/agent-master.token"] == ["0o600", "consul", "consul"]
        assert modes["/etc/consul.d/acl"] == ["0o700", "consul", "consul"], node
        for conf in ("/etc/consul.d/acl-tokens.json", "/etc/consul.d/apigee-mtls-services.json",
                     "/etc/consul.d/acl-agent-master.json"):
            assert modes[conf] == ["0o640", "root", "consul"], (node, conf)
        # the management token lives on the signer only
        assert (MGMT_TOKEN in modes) == (node == signer), (node, sorted(modes))
        if node == signer:
            assert modes[MGMT_TOKEN] == ["0o600", "consul", "consul"]
        keyrings = {p: m for p, m in modes.items() if p.endswith(".keyring")}
        assert keyrings, f"{node}: no serf keyring"
        for path, mode in keyrings.items():  # Consul's own copy of the gossip keys
            assert mode[0] == "0o600" and mode[1] == "consul", (node, path, mode)
        if node == signer:
            ca_keys = {p: m for p, m in modes.items()
                       if p.startswith("/etc/apigee-mtls/ca/") and "key" in os.path.basename(p)}
            assert ca_keys, "no CA key on the signer"
            assert all(m == ["0o600", "root", "root"] for m in ca_keys.values()), ca_keys
        else:
            gone = lab.run(node, "ls /etc/apigee-mtls/ca 2>/dev/null", check=False).stdout
            assert gone.strip() == "", f"{node} holds CA files: {gone}"
