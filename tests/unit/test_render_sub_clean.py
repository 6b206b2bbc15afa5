"""Each sub-``clean`` applied alone first undoes what depends on the files it removes, as in
template-formula (``package.clean`` includes ``config.clean``, which includes
``service.clean``): ``firewall.clean`` <- ``mesh.clean`` <- ``service.clean`` <- ``acl``,
``config``, ``tls`` and ``install`` ``.clean``. Rendered masterless (``state.show_sls``) on
Debian 12 for a client node; nothing is applied."""
import concurrent.futures

import pytest

from test_render_os_families import (CLIENT, OSES, SALT_CALL, _args, _salt_call,
                                     _write_minion_config, _write_tree)

pytestmark = pytest.mark.skipif(not SALT_CALL.exists(), reason=f"no {SALT_CALL} (make venv)")

#: sub-clean -> (what it must include, the sls its own states must require)
CHAIN = {
    "firewall": ((), None),
    "mesh": (("firewall",), "firewall"),
    "service": (("firewall", "mesh"), "mesh"),
    "acl": (("firewall", "mesh", "service"), "service"),
    "config": (("firewall", "mesh", "service"), "service"),
    "tls": (("firewall", "mesh", "service"), "service"),
    "install": (("firewall", "mesh", "service"), "service"),
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    base = tmp_path_factory.mktemp("subclean")
    extmods_root, pillar_root = _write_tree(base)
    d = _write_minion_config(base, "debian12", OSES["debian12"], extmods_root, pillar_root)
    assert _salt_call(d, "saltutil.sync_all")["rc"] == 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        jobs = {name: pool.submit(_salt_call, d, "state.show_sls", f"apigee_mtls.{name}.clean",
                                  minion_id=CLIENT, cachedir=d / f"cache-{name}")
                for name in CHAIN}
    return {name: fut.result() for name, fut in jobs.items()}


@pytest.mark.parametrize("name", CHAIN)
def test_sub_clean_undoes_its_dependents_first(rendered, name):
    res = rendered[name]
    assert res["rc"] == 0 and isinstance(res["out"], dict), res["stdout"] + res["stderr"]
    states = res["out"]
    slss = {s["__sls__"] for s in states.values()}
    includes, requires = CHAIN[name]
    want = {f"apigee_mtls.{n}.clean" for n in includes + (name,)}
    if "mesh" in includes + (name,):
        # mesh.clean includes the Envoy data plane's (also what mesh applies without Envoy)
        want.add("apigee_mtls.mesh.envoy_clean")
    assert slss == want, slss
    if requires is None:
        return
    own = {sid: s for sid, s in states.items() if s["__sls__"] == f"apigee_mtls.{name}.clean"}
    assert own
    needs = {sid: [r for kind in ("require", "onchanges", "watch")
                   for r in _args(state)[1].get(kind, []) if isinstance(r, dict)]
             for sid, state in own.items()}

    theirs = {sid for sid, s in states.items()
              if s["__sls__"] == f"apigee_mtls.{requires}.clean"}

    def after(sid, seen=()):
        """The state requires the dependency's sls, itself or through its own states; or it
        is ordered before one of the dependency's states on purpose (``require_in``: a
        client's ``consul leave`` before its agent stops)."""
        if {"sls": f"apigee_mtls.{requires}.clean"} in needs[sid]:
            return True
        if any(ref in theirs for req in _args(own[sid])[1].get("require_in", [])
               if isinstance(req, dict) for ref in req.values()):
            return True
        return any(after(ref, seen + (sid,)) for req in needs[sid] for ref in req.values()
                   if ref in needs and ref not in seen)

    assert all(after(sid) for sid in own), needs
