"""Issue 13: every sub-state applies alone. Its includes form no cycle (a sub-state pulls in
what it needs, never what needs it: a later concern attaches itself to an earlier one with
``require_in`` / ``onchanges_in``), and rendered alone (masterless ``state.show_sls`` on
Debian 12, for the signer, a Consul server, and for a client; nothing is applied) every
requisite of every state names a state of that render. The lab applies them alone
(``tests/lab/test_50_uninstall.py``)."""
import concurrent.futures
import pathlib
import re

import pytest

from test_render_os_families import (OSES, SALT_CALL, SIGNER, CLIENT, _args, _salt_call,
                                     _write_minion_config, _write_tree)

FORMULA = pathlib.Path(__file__).resolve().parents[2] / "formula" / "apigee_mtls"
SUB_STATES = ("install", "tls", "tls.ca", "config", "service", "acl", "connect_ca", "mesh",
              "firewall", "intentions", "keyring")
REQUISITES = ("require", "watch", "onchanges", "prereq", "onfail", "listen")


def _sls_path(name):
    path = FORMULA.joinpath(*name.split("."))
    return path / "init.sls" if path.is_dir() else path.with_suffix(".sls")


def include_graph():
    """{sls: {included sls}} from every ``include:`` list, every Jinja branch taken."""
    graph = {}
    for path in FORMULA.rglob("*.sls"):
        rel = path.relative_to(FORMULA.parent).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "init")
        text = path.read_text()
        block = re.search(r"^include:\n((?:[ \t]*(?:- .*|\{%.*%\})\n)+)", text, re.M)
        graph[name] = set(re.findall(r"^\s*- (apigee_mtls[\w.]*)\s*$", block.group(1), re.M)
                          ) if block else set()
    return graph


def test_includes_form_no_cycle():
    graph = include_graph()
    assert graph["apigee_mtls.config"] == {"apigee_mtls.install"}
    assert "apigee_mtls.service" in graph["apigee_mtls.acl"]
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", " -> ".join(path + [node])
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            visit(dep, path + [node])
        state[node] = "done"

    for node in sorted(graph):
        visit(node, [])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    if not SALT_CALL.exists():
        pytest.skip(f"no {SALT_CALL} (make venv)")
    base = tmp_path_factory.mktemp("substates")
    extmods_root, pillar_root = _write_tree(base)
    d = _write_minion_config(base, "debian12", OSES["debian12"], extmods_root, pillar_root)
    assert _salt_call(d, "saltutil.sync_all")["rc"] == 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        jobs = {(node, name): pool.submit(_salt_call, d, "state.show_sls",
                                          f"apigee_mtls.{name}", minion_id=node,
                                          cachedir=d / f"cache-{node}-{name}")
                for node in (SIGNER, CLIENT) for name in SUB_STATES}
    return {key: fut.result() for key, fut in jobs.items()}


@pytest.mark.parametrize("node", (SIGNER, CLIENT))
@pytest.mark.parametrize("name", SUB_STATES)
def test_sub_state_alone_renders_with_every_requisite_in_it(rendered, node, name):
    res = rendered[(node, name)]
    assert res["rc"] == 0 and isinstance(res["out"], dict), res["stdout"] + res["stderr"]
    states = res["out"]
    if name == "connect_ca" or (name in ("tls.ca", "intentions") and node == CLIENT):
        # the signer's only, connect_ca only with connect_ca:root_cert (not in this pillar)
        assert not states, sorted(states)
        return
    assert states, res
    slss = {s["__sls__"] for s in states.values()}
    by_kind = {}
    for sid, state in states.items():
        fun, args = _args(state)
        by_kind.setdefault(fun.split(".")[0], set()).update({sid, args.get("name", sid)})
    missing = []
    for sid, state in states.items():
        _, args = _args(state)
        for kind in REQUISITES:
            for req in args.get(kind, []):
                if not isinstance(req, dict):
                    continue
                (mod, ref), = req.items()
                if mod == "sls":
                    ok = ref in slss
                else:
                    ok = ref in by_kind.get(mod, set())
                if not ok:
                    missing.append((sid, kind, mod, ref))
    assert not missing, missing
