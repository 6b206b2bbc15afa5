"""Day-2 changes under traffic (lab/traffic.py): every node keeps opening new connections
through every flow it has (one every 100 ms, its targets in turn) and holds a long-lived
connection per flow that sends a request every second, while the change is rolled out with
the README's command, `salt '*' state.apply apigee_mtls`. What failed is counted."""
import copy
import json
import os
import sys

from conftest import REPO, labctl, state_summary, under_traffic

sys.path.insert(0, os.path.join(REPO, "lab"))
from traffic import CONTROL_INTERVAL, Traffic  # noqa: E402  pylint: disable=wrong-import-position

PIDS = "systemctl show -p MainPID --value consul"
CONFIG_STATE = "apigee_mtls_|-apigee-mtls-config-agent-file-managed_|-/etc/consul.d/consul.json_|-agent_config_managed"


def _pids(lab):
    return {n: lab.run(n, PIDS).stdout.strip() for n in lab.nodes}


def test_traffic_harness_counts_what_fails(mesh):
    """Control: the harness sees an outage. One component's sidecar on n2 is stopped for a
    few seconds: the flows to it fail, and only those."""
    lab = mesh
    plan = lab.salt("n2", "apigee_mtls.plan")["n2"]
    svc = next(s["id"] for s in plan["services"] if s["meta"].get("component") == "zookeeper"
               and s["port"] == 2181)
    traffic = Traffic(lab, interval=CONTROL_INTERVAL)  # a window of seconds
    traffic.start()
    lab.run("n2", f"systemctl stop apigee-mtls-proxy@{svc} && sleep 4 && "
                  f"systemctl start apigee-mtls-proxy@{svc}")
    report = traffic.stop()
    tot = report["totals"]
    assert tot["new_ok"] > 500 and tot["long_ok"] > 50, tot
    assert tot["new_failed"] > 0 and tot["max_gap"] >= 3, tot
    assert tot["failed_flows"] and all(f.endswith("n2 zookeeper") for f in tot["failed_flows"]), tot
    lab.wait_mesh_ready()


def test_reloadable_change_reloads_every_agent_and_loses_no_connection(mesh):
    """consul:log_level is a key Consul reloads: the preview says "would reload", the run
    reloads every agent (same PID, servers included), and not one new or long-lived
    connection fails; a leader exists at every sample."""
    lab = mesh
    pillar = copy.deepcopy(lab.pillar)
    pillar.setdefault("consul", {})["log_level"] = "DEBUG"
    labctl.write_pillar(pillar)  # the operator's pillar edit; state.apply compiles it fresh
    try:
        preview = lab.apply("*", "apigee_mtls", "test=True")
        for node in lab.nodes:
            cfg = preview[node][CONFIG_STATE]
            assert cfg["result"] is None and cfg["comment"].endswith("Consul would reload"), cfg
            assert cfg["changes"]["consul"] == {"keys": ["log_level"], "agent": "reload"}
        before = _pids(lab)
        ret, tot = under_traffic(lab, "reloadable agent setting (consul:log_level)", lab.apply)
        report = {"totals": tot}
        summary = state_summary(ret)
        assert not {n: s["failed"] for n, s in summary.items() if s["failed"]}, summary
        for node in lab.nodes:
            assert ret[node][CONFIG_STATE]["changes"]["consul"]["agent"] == "reload"
            level = json.loads(lab.run(node, "cat /etc/consul.d/consul.json").stdout)
            assert level["log_level"] == "DEBUG", node
        assert _pids(lab) == before, "an agent restarted"
        tot = report["totals"]
        assert tot["new_ok"] > 300 and tot["long_ok"] > 30, tot
        assert tot["new_failed"] == 0 and tot["long_broken"] == 0, tot
        assert tot["no_leader_samples"] == 0 and not tot["missing_reports"], tot
    finally:
        labctl.write_pillar(lab.pillar)
        restored = state_summary(lab.apply())
        assert all(not s["failed"] for s in restored.values()), restored
    lab.wait_mesh_ready()
