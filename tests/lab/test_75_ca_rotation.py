"""Day-2: rotation of the agent-TLS CA, staged by pillar in three applies, old and new CA
trusted together during the roll (README "CA rotation"):

1. ``ca_trust: [new]``: the signer creates the new CA; every bundle holds old + new;
   certificates are kept.
2. ``ca_generation: new, ca_trust: [old]``: every certificate is re-issued by the new CA;
   the bundle still holds both.
3. ``ca_generation: new``: only the new CA is trusted; the signer deletes the old one.

After each step: test=True previews it and changes nothing, the apply fails nowhere, bundles
and issuers are as planned on every node, every agent serves its new certificate and accepts
its peers' (new TLS connections between all nodes: Consul re-read its files on reload, it
was not restarted), members alive, mesh ready, a rerun changes nothing. A certificate of the
old CA kept aside is accepted everywhere until step 3 and refused everywhere after it.

The lab stays on the new generation: ``lab.pillar`` is updated, so that later tests, which
restore ``lab.pillar``, do not jump back to the old CA unstaged.
"""
import copy

from conftest import applied_ok, assert_no_loss, labctl, planner, state_summary, under_traffic

TLS_DIR = "/etc/consul.d/tls"
CA_DIR = "/etc/apigee-mtls/ca"
OLD_CERT = "/tmp/apigee-mtls-test-agent-old-ca.pem"  # on CLIENT: a certificate of the old CA
CLIENT = "n4"
PY = "/opt/salt/bin/python3"  # the salt venv's python: it has cryptography

TLS_CODE = f"""
import json
from cryptography import x509
from cryptography.x509.oid import NameOID
def cn(name):
    return name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
bundle = x509.load_pem_x509_certificates(open("{TLS_DIR}/ca.pem", "rb").read())
cert = x509.load_pem_x509_certificate(open("{TLS_DIR}/agent.pem", "rb").read())
verified_by = []
for ca in bundle:
    try:
        cert.verify_directly_issued_by(ca)
        verified_by.append(cn(ca.subject))
    except Exception:
        pass
print(json.dumps({{"bundle": [cn(c.subject) for c in bundle], "issuer": cn(cert.issuer),
                  "verified_by": verified_by, "serial": format(cert.serial_number, "x")}}))
"""

# New TLS connections to the HTTPS API (8501) of the given agents, presenting CERT (with the
# node's own key) and trusting the node's bundle: the status line, or why it failed. TLS 1.3
# lets the client finish its handshake before the server checks the client certificate: a
# refusal then shows as an alert or a closed connection on the first read.
HTTPS_CODE = """
import json, socket, ssl
from cryptography import x509
from cryptography.x509.oid import NameOID
out = {}
for ip in IPS:
    ctx = ssl.create_default_context(cafile="TLS_DIR/ca.pem")
    ctx.check_hostname = False
    ctx.load_cert_chain(CERT, "TLS_DIR/agent-key.pem")
    res = out[ip] = {}
    try:
        t = ctx.wrap_socket(socket.create_connection((ip, 8501), timeout=5))
        served = x509.load_der_x509_certificate(t.getpeercert(binary_form=True))
        res["served_issuer"] = served.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        t.settimeout(5)
        t.sendall(b"GET /v1/status/leader HTTP/1.0\\r\\nHost: consul\\r\\n\\r\\n")
        reply = t.recv(64)
        res["status"] = reply.split(b" ")[1].decode() if reply else "closed"
        t.close()
    except (ssl.SSLError, OSError) as exc:
        res["status"] = "refused: " + str(exc)[:120]
print(json.dumps(out))
"""


def _tls(lab):
    return {n: lab.py(n, TLS_CODE, python=PY) for n in lab.nodes}


def _https(lab, node, cert=TLS_DIR + "/agent.pem"):
    ips = [lab.ip[n] for n in lab.nodes if n != node]
    code = (HTTPS_CODE.replace("TLS_DIR", TLS_DIR).replace("IPS", repr(ips))
            .replace("CERT", repr(cert)))
    return lab.py(node, code, python=PY)


def _ca_files(lab, node):
    return sorted(lab.run(node, f"ls {CA_DIR}").stdout.split())


def _pids(lab):
    return {n: lab.run(n, "systemctl show -p MainPID --value consul").stdout.strip()
            for n in lab.nodes}


def _alive(lab):
    """{node: members of lab.nodes it does not see alive} (`consul members`)."""
    bad = {}
    for node in lab.nodes:
        rows = [l.split() for l in lab.run(node, "consul members").stdout.splitlines()[1:]]
        status = {r[0]: r[2] for r in rows}
        missing = [n for n in lab.nodes if status.get(n) != "alive"]
        if missing:
            bad[node] = missing
    return bad


def _step(lab, pillar, gens, cert_by, traffic, signer_preview=None,
          label="a CA rotation step"):
    """Preview (test=True, nothing changes), apply, check bundles and issuers, rerun.
    ``gens``: the bundle's CA generations, in order; ``cert_by``: the issuing generation;
    ``signer_preview``: a state the signer's preview must list; ``traffic``: a dict the
    step's traffic totals go to, under ``label``, for the caller to check once the rotation
    is over (a connection lost in step 1 must not leave the lab half-way through a rotation,
    which failed every later test of the session)."""
    signer = lab.model["tls"]["signer"]
    before, ca_before = _tls(lab), _ca_files(lab, signer)
    labctl.write_pillar(pillar)  # README: edit the pillar, apply (no refresh)
    preview = state_summary(lab.apply("*", "apigee_mtls", "test=True"))
    for node in lab.nodes:
        assert "apigee-mtls-tls-agent-cert-managed" in preview[node]["changed"], node
    if signer_preview:
        assert signer_preview in preview[signer]["changed"], preview[signer]
    assert _tls(lab) == before, "test=True changed a certificate or bundle"
    assert _ca_files(lab, signer) == ca_before, "test=True changed the signer's CA files"

    ret, tot = under_traffic(lab, label, lab.apply)
    summary = applied_ok(ret)
    traffic[label] = tot
    for node in lab.nodes:
        changed = summary[node]["changed"]
        assert "apigee-mtls-tls-agent-cert-managed" in changed, (node, changed)
        assert "apigee-mtls-service-reloaded" in changed, (node, changed)
        assert "apigee-mtls-service-running" not in changed, (node, changed)
    after = _tls(lab)
    names = [planner.ca_common_name(g) for g in gens]
    for node in lab.nodes:
        assert after[node]["bundle"] == names, (node, after[node])
        assert after[node]["issuer"] == planner.ca_common_name(cert_by), (node, after[node])
        assert after[node]["verified_by"] == [planner.ca_common_name(cert_by)], after[node]
        renewed = after[node]["serial"] != before[node]["serial"]
        assert renewed == (before[node]["issuer"] != after[node]["issuer"]), (node, before, after)
    want = sorted(f for g in gens for f in planner.ca_file_names(g).values())
    assert _ca_files(lab, signer) == want

    # every agent serves its certificate and accepts its peers', on new connections
    for node in lab.nodes:
        for ip, res in _https(lab, node).items():
            assert res.get("status") == "200", (node, ip, res)
            assert res["served_issuer"] == planner.ca_common_name(cert_by), (node, ip, res)
    assert _alive(lab) == {}
    lab.wait_mesh_ready()
    rerun = state_summary(lab.apply())
    assert all(not s["changed"] and not s["failed"] for s in rerun.values()), rerun
    return after


def test_ca_rotation_staged_by_pillar(applied):
    lab = applied
    lab.wait_mesh_ready()
    tls = lab.model["tls"]
    assert tls["ca_trust"] == [], "the lab must start outside a rotation"
    old = tls["ca_generation"]
    new = old + 1
    start = _tls(lab)
    assert {s["bundle"][0] for s in start.values()} == {planner.ca_common_name(old)}
    pids = _pids(lab)
    sidecars = lab.run("n2", "systemctl show -p MainPID 'apigee-mtls-proxy@*'").stdout
    base = copy.deepcopy(lab.pillar)
    current = lab.pillar
    traffic = {}
    try:
        # 1. trust the new CA everywhere; certificates unchanged
        step1 = dict(base, tls=dict(base.get("tls") or {}, ca_trust=[new]))
        current = step1
        after1 = _step(lab, step1, [old, new], old, traffic,
                       f"apigee-mtls-tls-ca-cert-managed-gen-{new}",
                       label="CA rotation step 1 (trust the new CA)")
        assert {n: s["serial"] for n, s in after1.items()} == {
            n: s["serial"] for n, s in start.items()}
        lab.run(CLIENT, f"cp {TLS_DIR}/agent.pem {OLD_CERT}")

        # 2. the new CA signs; every certificate re-issued, both CAs still trusted
        step2 = dict(base, tls=dict(base.get("tls") or {}, ca_generation=new, ca_trust=[old]))
        current = step2
        _step(lab, step2, [new, old], new, traffic,
              label="CA rotation step 2 (the new CA signs)")
        for ip, res in _https(lab, CLIENT, OLD_CERT).items():
            assert res.get("status") == "200", ("old CA still trusted", ip, res)

        # 3. only the new CA; the signer deletes the old one
        step3 = dict(base, tls=dict(base.get("tls") or {}, ca_generation=new))
        current = step3
        _step(lab, step3, [new], new, traffic, f"apigee-mtls-tls-ca-key-absent-gen-{old}",
              label="CA rotation step 3 (drop the old CA)")
        for ip, res in _https(lab, CLIENT, OLD_CERT).items():
            assert res.get("status") != "200", ("old CA must be refused", ip, res)

        assert _pids(lab) == pids, "an agent was restarted during the rotation"
        assert lab.run("n2", "systemctl show -p MainPID 'apigee-mtls-proxy@*'").stdout == sidecars
        signer = lab.model["tls"]["signer"]
        for node in lab.nodes:
            found = lab.run(node, "find / -xdev -name 'ca-key*.pem' 2>/dev/null",
                            check=False).stdout.split()
            key = f"{CA_DIR}/{planner.ca_file_names(new)['key']}"
            assert found == ([key] if node == signer else []), (node, found)
    finally:
        lab.run(CLIENT, f"rm -f {OLD_CERT}", check=False)
        # later tests restore lab.pillar: keep it on what the cluster now runs
        lab.pillar = current
        lab.model = planner.normalize(current)
    lab.wait_mesh_ready()
    assert len(traffic) == 3, traffic
    for label, tot in traffic.items():
        print(label, tot)
        assert_no_loss(tot)


def test_node_powered_off_during_step_2_catches_up_with_one_targeted_apply(applied):
    """Issue 16: a whole rotation (the lab's generation to the next) with n5 powered off during
    step 2. Step 1 runs everywhere; the others then apply step 2 (the new CA signs) while n5
    is off. Booted again, n5 still presents a certificate of the old CA, which everyone
    still trusts; one `salt n5 state.apply apigee_mtls` re-issues it from the new CA and it
    passes `apigee_mtls.verify`, with no other step. Step 3 then runs everywhere."""
    lab = applied
    lab.wait_mesh_ready()
    off = "n5"
    others = [n for n in lab.nodes if n != off]
    base = copy.deepcopy(lab.pillar)
    old = lab.model["tls"]["ca_generation"]
    new = old + 1
    current = lab.pillar
    state = labctl.load_state()
    try:
        step1 = dict(base, tls=dict(base.get("tls") or {}, ca_trust=[new]))
        current = step1
        labctl.write_pillar(step1)
        applied_ok(lab.apply())
        lab.wait_mesh_ready()

        step2 = dict(base, tls=dict(base.get("tls") or {}, ca_generation=new, ca_trust=[old]))
        current = step2
        labctl.write_pillar(step2)
        labctl.stop_node(off, state)
        try:
            applied_ok(lab.salt("-L", ",".join(others), "state.apply", "apigee_mtls", "-t", "900",
                         timeout=900))
        finally:
            labctl.boot_node(off, state)
            labctl.wait_minions([off])
        tls = _tls(lab)
        assert tls[off]["issuer"] == planner.ca_common_name(old), tls[off]  # it missed step 2
        assert {tls[n]["issuer"] for n in others} == {planner.ca_common_name(new)}, tls

        ret = lab.apply(off)
        summary = applied_ok(ret)
        assert "apigee-mtls-tls-agent-cert-managed" in summary[off]["changed"], summary[off]
        tls = _tls(lab)
        assert tls[off]["issuer"] == planner.ca_common_name(new), tls[off]
        assert tls[off]["bundle"] == [planner.ca_common_name(g) for g in (new, old)], tls[off]
        lab.wait_mesh_ready(timeout=120)
        for ip, res in _https(lab, off).items():
            assert res.get("status") == "200", (off, ip, res)

        step3 = dict(base, tls=dict(base.get("tls") or {}, ca_generation=new))
        current = step3
        labctl.write_pillar(step3)
        applied_ok(lab.apply())
        tls = _tls(lab)
        assert {n: t["bundle"] for n, t in tls.items()} == {
            n: [planner.ca_common_name(new)] for n in lab.nodes}, tls
    finally:
        lab.pillar = current
        lab.model = planner.normalize(current)
        labctl.write_pillar(current)
    lab.wait_mesh_ready()
    assert _alive(lab) == {}
