"""Day-2: agent certificates are renewed before expiry, by pillar thresholds, without downtime:
new certificates everywhere, agents reloaded (not restarted), served at once, flows untouched."""
import copy
import json

from conftest import assert_no_loss, labctl, state_summary, under_traffic

SERIAL_CODE = """
import json
from cryptography import x509
c = x509.load_pem_x509_certificate(open('/etc/consul.d/tls/agent.pem', 'rb').read())
print(json.dumps({"serial": format(c.serial_number, "x"),
                  "days": (c.not_valid_after_utc - c.not_valid_before_utc).days}))
"""

SERVED_CODE = """
import json, socket, ssl, sys
ctx = ssl.create_default_context(cafile="/etc/consul.d/tls/ca.pem")
ctx.check_hostname = False
ctx.load_cert_chain("/etc/consul.d/tls/agent.pem", "/etc/consul.d/tls/agent-key.pem")
t = ctx.wrap_socket(socket.create_connection((sys.argv[1], 8501), timeout=5))
from cryptography import x509
c = x509.load_der_x509_certificate(t.getpeercert(binary_form=True))
print(json.dumps(format(c.serial_number, "x")))
"""


def _serials(lab):
    return {n: lab.py(n, SERIAL_CODE, python="/opt/salt/bin/python3") for n in lab.nodes}


def _pids(lab):
    return {n: lab.run(n, "systemctl show -p MainPID --value consul").stdout.strip()
            for n in lab.nodes}


def test_certificates_renew_by_threshold_without_restart(applied):
    lab = applied
    lab.wait_mesh_ready()
    before, pids = _serials(lab), _pids(lab)
    sidecars = lab.run("n2", "systemctl show -p MainPID 'apigee-mtls-proxy@*'").stdout
    pillar = copy.deepcopy(lab.pillar)
    # every current certificate (365 days) now has fewer days left than the threshold
    pillar["tls"] = dict(pillar.get("tls") or {}, cert_days_valid=400, cert_days_remaining=380)
    try:
        labctl.write_pillar(pillar)  # README: edit the pillar, apply (no refresh)
        preview = state_summary(lab.apply("*", "apigee_mtls", "test=True"))
        for node in lab.nodes:
            assert "apigee-mtls-tls-agent-cert-managed" in preview[node]["changed"], node
        assert _serials(lab) == before, "test=True renewed a certificate"
        ret, tot = under_traffic(lab, "certificate renewal", lab.apply)
        summary = state_summary(ret)
        assert all(not s["failed"] for s in summary.values()), summary
        assert_no_loss(tot)
        after = _serials(lab)
        for node in lab.nodes:
            assert after[node]["serial"] != before[node]["serial"], node
            assert after[node]["days"] == 400, after[node]
        assert _pids(lab) == pids, "an agent was restarted for a certificate renewal"
        assert lab.run("n2", "systemctl show -p MainPID 'apigee-mtls-proxy@*'").stdout == sidecars
        # the agents serve the new certificate right away (reload, not restart)
        signer = lab.model["tls"]["signer"]
        served = lab.py("n4", SERVED_CODE.replace("sys.argv[1]", repr(lab.ip[signer])),
                        python="/opt/salt/bin/python3")
        assert served == after[signer]["serial"]
        rerun = state_summary(lab.apply())
        assert all(not s["changed"] for s in rerun.values()), rerun
        lab.wait_mesh_ready()
    finally:
        labctl.write_pillar(lab.pillar)  # README: edit the pillar, apply (no refresh)
    # back to the default thresholds: the 400-day certificates are fine, nothing changes
    back = state_summary(lab.apply())
    assert all(not s["changed"] and not s["failed"] for s in back.values()), back
    assert json.dumps(_serials(lab), sort_keys=True) == json.dumps(after, sort_keys=True)
