"""A node dropped from the pillar without `clean` (a lost or compromised machine) is cut off
completely when its peers apply: new connections refused, and the connections it already had
through their sidecars closed by the end of that apply. Put back in the pillar, it rejoins
after one `salt '*' state.apply apigee_mtls`: its new token reaches its running sidecars."""
import copy
import json
import os
import sys

from conftest import REPO, labctl, state_summary

sys.path.insert(0, os.path.join(REPO, "lab"))
from traffic import Traffic  # noqa: E402  pylint: disable=wrong-import-position

GONE = "n5"
CLOSED = ("apigee_mtls_|-apigee-mtls-firewall-stale-connections-closed_|-"
          "apigee-mtls-firewall-stale-connections-closed_|-stale_connections_closed")
SIDECARS = ("apigee_mtls_|-apigee-mtls-mesh-sidecars-token-current_|-"
            "/etc/consul.d/acl/agent.token_|-sidecars_current")


def _held_by(lab, node, ip):
    """Established TCP connections on ``node`` from ``ip`` to a local port below the ephemeral
    range (Consul's and the sidecars' ports)."""
    out = lab.run(node, ["ss", "-Htn", "state", "established", "dst", ip]).stdout
    conns = []
    for line in out.splitlines():
        local = line.split()[2]
        if int(local.rsplit(":", 1)[1]) < 32768:
            conns.append(line.split()[2] + " <- " + line.split()[3])
    return conns


def test_removed_node_is_cut_off_then_rejoins_after_one_apply(mesh):
    lab = mesh
    ip = lab.ip[GONE]
    others = [n for n in lab.nodes if n != GONE]
    traffic = Traffic(lab, nodes=[GONE])
    traffic.start()
    before = {n: _held_by(lab, n, ip) for n in others}
    assert any(before.values()), before  # n5's long-lived connections through peers' sidecars
    pillar = copy.deepcopy(lab.pillar)
    pillar["nodes"] = [n for n in pillar["nodes"] if n["id"] != GONE]
    labctl.write_pillar(pillar)
    try:
        ret = lab.salt("-L", ",".join(others), "state.apply", "apigee_mtls", "-t", "900",
                       timeout=900)
        summary = state_summary(ret)
        assert not {n: s["failed"] for n, s in summary.items() if s["failed"]}, summary
        after = {n: _held_by(lab, n, ip) for n in others}
        report = traffic.stop()
        print("established from", GONE, "before:", json.dumps(before))
        print("closed by the peers' apply:", {n: ret[n][CLOSED]["changes"] for n in others})
        print(GONE, "traffic while it was cut off:", json.dumps(report["totals"]))
        assert after == {n: [] for n in others}, after
        assert any(ret[n][CLOSED]["changes"].get("closed") for n in others)
        assert report["totals"]["long_broken"] > 0
    finally:
        labctl.write_pillar(lab.pillar)
    # put back: one apply everywhere, and the mesh works again, n5's flows included
    ret = lab.apply()
    summary = state_summary(ret)
    assert not {n: s["failed"] for n, s in summary.items() if s["failed"]}, summary
    print("sidecars restarted onto", GONE, "'s new token:", ret[GONE][SIDECARS]["changes"])
    assert ret[GONE][SIDECARS]["changes"].get("restarted"), ret[GONE][SIDECARS]
    lab.wait_mesh_ready(timeout=90)
    traffic = Traffic(lab)
    traffic.start()
    tot = traffic.stop()["totals"]
    assert tot["new_failed"] == 0 and tot["long_broken"] == 0 and tot["new_ok"] > 50, tot
