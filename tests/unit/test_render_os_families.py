"""The whole formula rendered masterless with the grains of each supported OS: Debian 12 (what
the lab runs), RHEL / Oracle Linux 7 and 8 (production). Nothing is applied:
``salt-call --local state.show_sls`` compiles the states and stops there.

Every state must render on every OS, for a Consul server that is the signer (n1) and for a
client (n4), ``apigee_mtls.clean`` included; the families get the same states, differing only
where a state renders an OS parameter (``parameters/``); the unit templates the states name
exist and render with the context the states give them.
"""

import concurrent.futures
import json
import pathlib
import subprocess
import sys

import jinja2
import pytest
import yaml

import apigee_mtls_plan  # registered by conftest.py
from conftest import load_topology

ROOT = pathlib.Path(__file__).resolve().parents[2]
FORMULA = ROOT / "formula"
SALT_CALL = pathlib.Path(sys.executable).with_name("salt-call")
TOPOLOGY = "5-node"
SIGNER, CLIENT = "n1", "n4"  # n1: ZooKeeper (Consul server) and signer; n4: postgres + qpid
NODES = (SIGNER, CLIENT)
SLS = ("apigee_mtls", "apigee_mtls.clean")

OSES = {
    "debian12": {"os": "Debian", "os_family": "Debian", "osmajorrelease": 12,
                 "osrelease": "12.8", "osfinger": "Debian-12", "oscodename": "bookworm"},
    "oracle7": {"os": "OEL", "os_family": "RedHat", "osmajorrelease": 7,
                "osrelease": "7.9", "osfinger": "Oracle Linux Server-7"},
    "rhel8": {"os": "RedHat", "os_family": "RedHat", "osmajorrelease": 8,
              "osrelease": "8.10", "osfinger": "Red Hat Enterprise Linux-8"},
}

#: what each family must get (parameters/)
EXPECTED = {
    "Debian": {"pkgs": ["iptables", "netcat-openbsd", "iproute2"],
               "shell": "/usr/sbin/nologin", "firewall_after": "After=local-fs.target"},
    "RedHat": {"pkgs": ["iptables", "iptables-services", "nmap-ncat", "iproute"],
               "shell": "/sbin/nologin",
               "firewall_after": "After=local-fs.target iptables.service ip6tables.service "
                                 "firewalld.service"},
}

#: the only states whose data may differ between OSes: those rendering an OS parameter
PARAMETER_STATES = {
    "apigee-mtls-install-pkgs-installed",  # pkgs
    "apigee-mtls-install-user-present",  # nologin_shell
    "apigee-mtls-install-proxy-user-present",  # nologin_shell
    "apigee-mtls-firewall-unit-managed",  # firewall_unit_after
    "apigee-mtls-mesh-proxy-unit-managed",  # systemd_start_limit_in_service
}

pytestmark = pytest.mark.skipif(not SALT_CALL.exists(), reason=f"no {SALT_CALL} (make venv)")


def _salt_call(config_dir, *args, cachedir=None, minion_id=None):
    cmd = [str(SALT_CALL), "--config-dir", str(config_dir), "--local", "--out=json",
           "--log-level=quiet"]
    if cachedir:
        cmd.append(f"--cachedir={cachedir}")
    if minion_id:
        cmd.append(f"--id={minion_id}")
    proc = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=120,
                          check=False)
    try:
        out = json.loads(proc.stdout)["local"]
    except (ValueError, KeyError):
        out = None
    if isinstance(out, dict) and "__extend__" in out:
        out = merge_extends(out)
    return {"rc": proc.returncode, "out": out, "stdout": proc.stdout, "stderr": proc.stderr,
            "cmd": " ".join(cmd + list(args))}


def merge_extends(states):
    """``state.show_sls`` lists an SLS's ``extend:`` apart (``__extend__``); merge their
    requisites into the states they extend, as a run does."""
    states = dict(states)
    for extend in states.pop("__extend__", []):
        for sid, body in extend.items():
            (module, args), = ((k, v) for k, v in body.items() if not k.startswith("__"))
            target = states[sid][module]
            for arg in (a for a in args if isinstance(a, dict)):
                for kind, reqs in arg.items():
                    have = next((a for a in target if isinstance(a, dict) and kind in a), None)
                    if have is None:
                        target.append({kind: list(reqs)})
                    else:
                        have[kind].extend(reqs)
    return states


def _write_tree(base, tls=None, mutate=None):
    """Pillar and the custom-module file root, shared by every OS's minion config;
    ``mutate(pillar)`` edits the apigee_mtls pillar first."""
    extmods_root = base / "extmods-root"
    extmods_root.mkdir()
    for kind in ("_modules", "_states", "_utils"):
        (extmods_root / kind).symlink_to(ROOT / kind)
    pillar_root = base / "pillar"
    pillar_root.mkdir()
    (pillar_root / "top.sls").write_text("base:\n  '*':\n    - apigee_mtls\n")
    pillar = load_topology(TOPOLOGY)
    if tls is not None:
        pillar["tls"] = tls
    if mutate is not None:
        mutate(pillar)
    (pillar_root / "apigee_mtls.sls").write_text(yaml.safe_dump({"apigee_mtls": pillar}))
    return extmods_root, pillar_root


def _write_minion_config(base, name, grains, extmods_root, pillar_root, overlay=None,
                         extmods=None):
    config_dir = base / name
    config_dir.mkdir()
    roots = ([str(overlay)] if overlay else []) + [str(FORMULA), str(extmods_root)]
    config = {
        "id": SIGNER,
        "file_client": "local",
        "file_roots": {"base": roots},
        "pillar_roots": {"base": [str(pillar_root)]},
        "cachedir": str(config_dir / "cache"),
        # shared by the per-call cachedirs
        "extension_modules": str(extmods or config_dir / "extmods"),
        "pki_dir": str(config_dir / "pki"),
        "sock_dir": str(config_dir / "sock"),
        "log_file": str(config_dir / "minion.log"),
        "enable_fqdns_grains": False,
        "grains": dict(grains, init="systemd"),
    }
    (config_dir / "minion").write_text(yaml.safe_dump(config))
    # made here, not by the first salt-call: two calls started at once on a fresh config
    # directory both create them, and the second fails with "File exists" (seen in CI)
    for path in ("pki", "sock"):
        (config_dir / path).mkdir(mode=0o700)
    return config_dir


@pytest.fixture(scope="module")
def renders(tmp_path_factory):
    """``{os: {"grains": ..., (node, sls): salt-call result}}``, every call run once."""
    base = tmp_path_factory.mktemp("render")
    extmods_root, pillar_root = _write_tree(base)
    dirs = {name: _write_minion_config(base, name, grains, extmods_root, pillar_root)
            for name, grains in OSES.items()}
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        syncs = {name: pool.submit(_salt_call, d, "saltutil.sync_all")
                 for name, d in dirs.items()}
        for name, fut in syncs.items():
            res = fut.result()
            assert res["rc"] == 0 and "modules.apigee_mtls" in (res["out"] or {}).get(
                "modules", []), res
        jobs = {}
        for name, d in dirs.items():
            jobs[(name, "grains")] = pool.submit(
                _salt_call, d, "grains.item", "os", "os_family", "osmajorrelease")
            for node in NODES:
                for sls in SLS:
                    jobs[(name, (node, sls))] = pool.submit(
                        _salt_call, d, "state.show_sls", sls, minion_id=node,
                        cachedir=d / f"cache-{node}-{sls}")
        results = {name: {} for name in OSES}
        for (name, key), fut in jobs.items():
            results[name][key] = fut.result()
    return results


def _states(renders, os_name, node, sls):
    res = renders[os_name][(node, sls)]
    assert res["rc"] == 0 and isinstance(res["out"], dict) and res["out"], (
        f"{res['cmd']} did not render:\n{res['stdout']}\n{res['stderr']}")
    return res["out"]


def _args(state):
    """A show_sls state ``{"__sls__": ..., "pkg": [{"pkgs": [...]}, "installed", ...]}`` ->
    (function, {argument: value})."""
    (module, body), = ((k, v) for k, v in state.items() if not k.startswith("__"))
    fun = next(a for a in body if isinstance(a, str))
    args = {}
    for arg in body:
        if isinstance(arg, dict):
            args.update(arg)
    return f"{module}.{fun}", args


CASES = [(os_name, node, sls) for os_name in OSES for node in NODES for sls in SLS]


@pytest.mark.parametrize("os_name", OSES)
def test_minion_config_grains_take_effect(renders, os_name):
    res = renders[os_name]["grains"]
    assert res["rc"] == 0, res
    want = OSES[os_name]
    assert res["out"] == {k: want[k] for k in ("os", "os_family", "osmajorrelease")}


@pytest.mark.parametrize("os_name,node,sls", CASES)
def test_every_state_renders(renders, os_name, node, sls):
    states = _states(renders, os_name, node, sls)
    for state_id, state in states.items():
        assert state["__sls__"].startswith("apigee_mtls"), state_id
        fun, _ = _args(state)
        assert "." in fun, (state_id, state)
    if sls == "apigee_mtls":
        signer_only = {"apigee-mtls-tls-ca-key-managed", "apigee-mtls-tls-ca-cert-managed",
                       "apigee-mtls-intentions-managed", "apigee-mtls-keyring-managed"}
        if node == SIGNER:
            assert signer_only <= set(states)
        else:
            assert not signer_only & set(states)
        assert "apigee-mtls-firewall-chains-managed" in states
    else:
        assert {"apigee-mtls-firewall-chains-absent", "apigee-mtls-install-user-absent",
                "apigee-mtls-clean-systemd-forget"} <= set(states)


@pytest.mark.parametrize("os_name", OSES)
def test_packages_and_nologin_shell_follow_the_os_family(renders, os_name):
    want = EXPECTED[OSES[os_name]["os_family"]]
    for node in NODES:
        states = _states(renders, os_name, node, "apigee_mtls")
        fun, args = _args(states["apigee-mtls-install-pkgs-installed"])
        assert (fun, args["pkgs"]) == ("pkg.installed", want["pkgs"])
        users = [_args(s)[1] for s in states.values() if _args(s)[0] == "user.present"]
        assert users and all(u["shell"] == want["shell"] for u in users), users


@pytest.mark.parametrize("node,sls", [(node, sls) for node in NODES for sls in SLS])
def test_families_differ_only_in_os_parameters(renders, node, sls):
    debian = _states(renders, "debian12", node, sls)
    for os_name in OSES:
        other = _states(renders, os_name, node, sls)
        assert set(other) == set(debian), os_name
        differing = {i for i in debian if debian[i] != other[i]}
        assert differing <= PARAMETER_STATES, (os_name, sorted(differing - PARAMETER_STATES))


def _units(states):
    """``{unit file name: rendered text}`` for the states' jinja templates, checking that every
    ``salt://`` source but the pillar's Consul binary is a file of the formula."""
    external = load_topology(TOPOLOGY)["consul"]["install"]["source"]
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    units = {}
    for state_id, state in states.items():
        fun, args = _args(state)
        source = args.get("source")
        if not fun.startswith("file.") or source is None or source == external:
            continue
        assert source.startswith("salt://apigee_mtls/files/"), (state_id, source)
        path = FORMULA / source[len("salt://"):]
        assert path.is_file(), (state_id, source)
        # systemd units, as file.managed renders them: the state's context (encrypt.json's
        # template calls the execution module: test_encrypt_json_template_... covers it)
        if args.get("template") == "jinja" and args["name"].endswith(".service"):
            text = env.from_string(path.read_text()).render(**args.get("context", {}))
            units[pathlib.PurePath(args["name"]).name] = text
    return units


def _sections(text):
    """A unit's settings by section, comments and blank lines left out."""
    sections, current = {}, None
    for line in text.splitlines():
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        elif current is not None and line and not line.startswith("#"):
            current.append(line)
    return sections


@pytest.mark.parametrize("os_name,node", [(o, n) for o in OSES for n in NODES])
def test_sources_exist_and_unit_templates_render(renders, os_name, node):
    units = _units(_states(renders, os_name, node, "apigee_mtls"))
    assert sorted(units) == [
        "apigee-mtls-firewall.service", "apigee-mtls-proxy@.service", "consul.service"]
    for name, text in units.items():
        assert "{{" not in text and "{%" not in text, name
        assert text.startswith("# Managed by Salt (apigee_mtls).") and "[Install]" in text, name


def _unit(renders, os_name, name):
    return _sections(_units(_states(renders, os_name, SIGNER, "apigee_mtls"))[name])


@pytest.mark.parametrize("os_name", OSES)
def test_firewall_unit_starts_after_what_would_flush_its_chains(renders, os_name):
    unit = _unit(renders, os_name, "apigee-mtls-firewall.service")
    after = [line for line in unit["Unit"] if line.startswith("After=")]
    assert after == [EXPECTED[OSES[os_name]["os_family"]]["firewall_after"]]


@pytest.mark.parametrize("os_name,node", [(o, n) for o in OSES for n in NODES])
def test_ipv6_firewall_renders(renders, os_name, node):
    """Issue 11: the IPv6 rules file holds the planner's ip6tables-restore payload, the chains
    state compares it, and clean removes the IPv6 chains and file too."""
    states = _states(renders, os_name, node, "apigee_mtls")
    fun, args = _args(states["apigee-mtls-firewall-rules6-managed"])
    plan = apigee_mtls_plan.plan(load_topology(TOPOLOGY), node)
    assert (fun, args["name"]) == ("file.managed", "/etc/apigee-mtls/ip6tables.rules")
    assert args["contents"] == apigee_mtls_plan.render_ip6tables_restore(plan["firewall"])
    assert "-A APIGEE-MTLS-OUT -o lo -j RETURN" in args["contents"]
    fun, args = _args(states["apigee-mtls-firewall-chains-managed"])
    assert args["rules6_file"] == "/etc/apigee-mtls/ip6tables.rules"
    assert {"file": "apigee-mtls-firewall-rules6-managed"} in args["require"]
    clean = _states(renders, os_name, node, "apigee_mtls.clean")
    _, args = _args(clean["apigee-mtls-firewall-chains-absent"])
    assert "ip6tables -w -S APIGEE-MTLS-IN" in args["onlyif"]
    assert "ip6tables -w -S APIGEE-MTLS-OUT" in args["onlyif"]
    absent = {_args(s)[1]["name"] for s in clean.values() if _args(s)[0] == "file.absent"}
    assert "/etc/apigee-mtls/ip6tables.rules" in absent


@pytest.mark.parametrize("os_name", OSES)
@pytest.mark.parametrize("node", NODES)
def test_stale_connections_are_closed_after_the_chains(renders, os_name, node):
    """Issue 16: every member node closes non-members' established connections, with the
    plan's ports and members, once the chains refusing them are in place."""
    states = _states(renders, os_name, node, "apigee_mtls")
    fun, args = _args(states["apigee-mtls-firewall-stale-connections-closed"])
    plan = apigee_mtls_plan.plan(load_topology(TOPOLOGY), node)
    assert fun == "apigee_mtls.stale_connections_closed"
    assert args["ports"] == plan["firewall"]["member_ports"]
    assert args["members"] == plan["firewall"]["members"]
    assert args["require"] == [{"apigee_mtls": "apigee-mtls-firewall-chains-managed"}]


@pytest.mark.parametrize("os_name", OSES)
def test_sidecar_restarts_are_unlimited_for_the_os_systemd(renders, os_name):
    """systemd 219 (EL7) ignores [Unit] StartLimitIntervalSec=; [Service] StartLimitInterval=
    is its spelling (still accepted by later versions, but Debian keeps its unit as it was)."""
    unit = _unit(renders, os_name, "apigee-mtls-proxy@.service")
    start_limits = {section: [line for line in lines if line.startswith("StartLimit")]
                    for section, lines in unit.items()}
    if OSES[os_name]["osmajorrelease"] == 7:
        assert start_limits == {"Unit": [], "Service": ["StartLimitInterval=0"], "Install": []}
    else:
        assert start_limits == {"Unit": ["StartLimitIntervalSec=0"], "Service": [],
                                "Install": []}


# ---------------------------------------------------------------------------------------------
# CA rotation: the signer's CA states follow tls:ca_generation and tls:ca_trust

#: the three applies of a rotation from generation 1 to 2 (README "CA rotation")
ROTATION = {"trust-2": {"ca_trust": [2]}, "sign-2": {"ca_generation": 2, "ca_trust": [1]},
            "only-2": {"ca_generation": 2}}
CA_STATES = ("apigee-mtls-tls-ca-key-managed", "apigee-mtls-tls-ca-cert-managed")


@pytest.fixture(scope="module")
def rotation(tmp_path_factory):
    """``{"ca_dir": path, (step, node): salt-call result}``: the formula rendered (Debian) for
    each rotation step, on a signer whose CA directory holds generations 1 and 2 (a
    parameters overlay points state_dir at a temporary directory)."""
    base = tmp_path_factory.mktemp("rotation")
    ca_dir = base / "state" / "ca"
    ca_dir.mkdir(parents=True)
    for name in ("ca.pem", "ca-key.pem", "ca-2.pem", "ca-key-2.pem", "ca.pem.tmp"):
        (ca_dir / name).write_text("not read, only listed\n")
    params = base / "overlay" / "apigee_mtls" / "parameters"
    params.mkdir(parents=True)
    defaults = yaml.safe_load((FORMULA / "apigee_mtls/parameters/defaults.yaml").read_text())
    defaults["state_dir"] = str(base / "state")
    (params / "defaults.yaml").write_text(yaml.safe_dump(defaults))
    extmods = base / "extmods"
    dirs = {}
    for step, tls in ROTATION.items():
        (base / step).mkdir()
        extmods_root, pillar_root = _write_tree(base / step, tls)
        dirs[step] = _write_minion_config(base / step, "debian12", OSES["debian12"],
                                          extmods_root, pillar_root, base / "overlay", extmods)
    sync = _salt_call(dirs["trust-2"], "saltutil.sync_all")
    assert sync["rc"] == 0, sync
    cases = [(step, SIGNER) for step in ROTATION] + [("only-2", CLIENT)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        jobs = {(step, node): pool.submit(
            _salt_call, dirs[step], "state.show_sls", "apigee_mtls", minion_id=node,
            cachedir=dirs[step] / f"cache-{node}") for step, node in cases}
        results = {key: fut.result() for key, fut in jobs.items()}
    results["ca_dir"] = ca_dir
    return results


def _ca_states(states):
    """``{state id: (function, args)}`` of the signer's CA states."""
    return {i: _args(s) for i, s in states.items() if i.startswith("apigee-mtls-tls-ca-")}


def _rotation_states(rotation, step, node=SIGNER):
    res = rotation[(step, node)]
    assert res["rc"] == 0 and isinstance(res["out"], dict) and res["out"], (
        f"{res['cmd']} did not render:\n{res['stdout']}\n{res['stderr']}")
    return res["out"]


def _requires(args, kind):
    return [r[kind] for r in args.get("require", []) if kind in r]


def test_first_ca_is_unchanged_without_rotation_keys(renders):
    """An existing cluster (no ca_generation, no ca_trust) keeps its CA states as they were."""
    states = _ca_states(_states(renders, "debian12", SIGNER, "apigee_mtls"))
    assert sorted(states) == ["apigee-mtls-tls-ca-cert-managed", "apigee-mtls-tls-ca-dir-managed",
                              "apigee-mtls-tls-ca-key-managed"]
    fun, key = states["apigee-mtls-tls-ca-key-managed"]
    assert (fun, key["name"], key["new"]) == (
        "x509.private_key_managed", "/etc/apigee-mtls/ca/ca-key.pem", False)
    fun, cert = states["apigee-mtls-tls-ca-cert-managed"]
    assert (fun, cert["name"], cert["signing_private_key"], cert["CN"]) == (
        "x509.certificate_managed", "/etc/apigee-mtls/ca/ca.pem",
        "/etc/apigee-mtls/ca/ca-key.pem", "apigee_mtls cluster CA")


@pytest.mark.parametrize("step, signing, other", [("trust-2", 1, 2), ("sign-2", 2, 1)])
def test_rotation_signer_keeps_every_trusted_ca(rotation, step, signing, other):
    states = _rotation_states(rotation, step)
    ca_dir = rotation["ca_dir"]
    files = {1: ("ca.pem", "ca-key.pem"), 2: ("ca-2.pem", "ca-key-2.pem")}
    names = {1: "apigee_mtls cluster CA", 2: "apigee_mtls cluster CA generation 2"}
    cas = _ca_states(states)
    assert not [i for i in cas if "absent" in i], sorted(cas)
    for gen, suffix in ((signing, ""), (other, f"-gen-{other}")):
        _, key = cas["apigee-mtls-tls-ca-key-managed" + suffix]
        _, cert = cas["apigee-mtls-tls-ca-cert-managed" + suffix]
        assert key["name"] == str(ca_dir / files[gen][1])
        assert (cert["name"], cert["signing_private_key"], cert["CN"]) == (
            str(ca_dir / files[gen][0]), str(ca_dir / files[gen][1]), names[gen])
        assert _requires(cert, "x509") == ["apigee-mtls-tls-ca-key-managed" + suffix]
    # the signer signs its own certificate once every trusted CA exists
    _, agent = _args(states["apigee-mtls-tls-agent-cert-managed"])
    assert _requires(agent, "x509") == ["apigee-mtls-tls-agent-key-managed",
                                        "apigee-mtls-tls-ca-cert-managed",
                                        f"apigee-mtls-tls-ca-cert-managed-gen-{other}"]


def test_rotation_end_removes_the_untrusted_ca(rotation):
    states = _rotation_states(rotation, "only-2")
    ca_dir = rotation["ca_dir"]
    cas = _ca_states(states)
    assert sorted(cas) == [
        "apigee-mtls-tls-ca-cert-absent-gen-1", "apigee-mtls-tls-ca-cert-managed",
        "apigee-mtls-tls-ca-dir-managed", "apigee-mtls-tls-ca-key-absent-gen-1",
        "apigee-mtls-tls-ca-key-managed"]
    assert cas["apigee-mtls-tls-ca-cert-managed"][1]["name"] == str(ca_dir / "ca-2.pem")
    for kind, name in (("key", "ca-key.pem"), ("cert", "ca.pem")):
        fun, args = cas[f"apigee-mtls-tls-ca-{kind}-absent-gen-1"]
        assert (fun, args["name"]) == ("file.absent", str(ca_dir / name))
        # never before the signing CA is in place
        assert _requires(args, "x509") == ["apigee-mtls-tls-ca-cert-managed"]


def test_rotation_leaves_other_nodes_without_ca_states(rotation):
    states = _rotation_states(rotation, "only-2", CLIENT)
    assert not _ca_states(states)
    _, agent = _args(states["apigee-mtls-tls-agent-cert-managed"])
    assert _requires(agent, "x509") == ["apigee-mtls-tls-agent-key-managed"]


def test_certificate_or_bundle_change_reloads_consul(renders):
    """The certificate and the CA bundle are written by one state: one reload for both."""
    for node in NODES:
        states = _states(renders, "debian12", node, "apigee_mtls")
        _, reload = _args(states["apigee-mtls-service-reloaded"])
        assert {"apigee_mtls": "apigee-mtls-tls-agent-cert-managed"} in reload["onchanges"]


def test_encrypt_json_template_renders_the_plan_and_keeps_the_key_out_of_the_sls(renders):
    """The gossip key is rendered on the minion from its own pillar: the SLS (what
    state.show_sls prints) names only the template, and the template gives the planner's
    encrypt_config as JSON."""
    states = _states(renders, "debian12", SIGNER, "apigee_mtls")
    key = load_topology(TOPOLOGY)["secrets"]["gossip_key"]
    assert key not in json.dumps(states)
    fun, args = _args(states["apigee-mtls-config-encrypt-file-managed"])
    assert (fun, args["source"], args["template"], args["mode"]) == (
        "file.managed", "salt://apigee_mtls/files/encrypt.json.jinja", "jinja", "0640")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    env.filters["json"] = lambda value, **kw: json.dumps(value, **kw)
    plan = apigee_mtls_plan.plan(load_topology(TOPOLOGY), SIGNER)
    stub = {"apigee_mtls.plan": lambda secrets=False: plan if secrets else {}}
    text = env.from_string((FORMULA / "apigee_mtls/files/encrypt.json.jinja").read_text())
    assert json.loads(text.render(salt=stub)) == plan["encrypt_config"]
    assert json.loads(text.render(salt=stub))["encrypt"] == key


def test_every_node_checks_its_own_keyring_and_the_signer_does_so_before_rotating(renders):
    """A node that missed a rotation is repaired by its next apply (issue 16): every node runs
    apigee_mtls.local_keyring_managed once its agent runs, with its data dir, its LAN peers,
    the agent's local master token and, on a server, its WAN keyring; the signer's
    cluster-wide rotation comes after its own check. No key in the SLS."""
    pillar = load_topology(TOPOLOGY)
    for node in NODES:
        states = _states(renders, "debian12", node, "apigee_mtls")
        assert pillar["secrets"]["gossip_key"] not in json.dumps(states)
        fun, args = _args(states["apigee-mtls-keyring-local-managed"])
        plan = apigee_mtls_plan.plan(pillar, node)
        assert fun == "apigee_mtls.local_keyring_managed"
        assert {k: args[k] for k in ("key_pillar", "data_dir", "server", "peers", "user",
                                     "group", "token_file")} == {
            "key_pillar": "apigee_mtls:secrets:gossip_key",
            "data_dir": plan["consul"]["data_dir"], "server": node == SIGNER,
            "peers": [n for n in ("n1", "n2", "n3", "n4", "n5") if n != node],
            "user": plan["consul"]["user"], "group": plan["consul"]["group"],
            "token_file": plan["acl"]["agent_master_token_file"]}
        assert _requires(args, "service") == ["apigee-mtls-service-running"]
    _, rotation = _args(_states(renders, "debian12", SIGNER, "apigee_mtls")[
        "apigee-mtls-keyring-managed"])
    assert "apigee-mtls-keyring-local-managed" in _requires(rotation, "apigee_mtls")


# ---------------------------------------------------------------------------------------------
# variants: one pillar or grain change each, rendered for the signer

def _bad_gossip_key(pillar):
    pillar["secrets"]["gossip_key"] = "not-base64!"


#: an apigee_mtls:lookup overriding OS parameters (a site's own packages and paths)
LOOKUP = {"pkgs": ["iptables", "site-netcat"], "firewall_script": "/opt/site/apigee-fw",
          "systemd_start_limit_in_service": True}


def _lookup(pillar):
    pillar["lookup"] = LOOKUP


#: name -> (grains, pillar mutation)
VARIANTS = {
    "bad-pillar": (OSES["debian12"], _bad_gossip_key),
    "lookup-debian12": (OSES["debian12"], _lookup),
    "lookup-oracle7": (OSES["oracle7"], _lookup),
    "suse": ({"os": "SUSE", "os_family": "Suse", "osmajorrelease": 15, "osrelease": "15.5",
              "osfinger": "SLES-15"}, None),
    "windows": ({"os": "Windows", "os_family": "Windows", "osmajorrelease": 2022,
                 "osrelease": "2022Server", "osfinger": "Windows-2022Server"}, None),
}


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """``{name: salt-call result}``: ``state.show_sls apigee_mtls`` on the signer for each
    of VARIANTS (one minion config each, sharing one extension-module sync)."""
    base = tmp_path_factory.mktemp("variants")
    extmods = base / "extmods"
    dirs = {}
    for name, (grains, mutate) in VARIANTS.items():
        (base / name).mkdir()
        extmods_root, pillar_root = _write_tree(base / name, mutate=mutate)
        dirs[name] = _write_minion_config(base / name, "minion", grains, extmods_root,
                                          pillar_root, extmods=extmods)
    sync = _salt_call(next(iter(dirs.values())), "saltutil.sync_all")
    assert sync["rc"] == 0, sync
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        jobs = {name: pool.submit(_salt_call, d, "state.show_sls", "apigee_mtls")
                for name, d in dirs.items()}
        return {name: fut.result() for name, fut in jobs.items()}


def _render_errors(res):
    """The render errors of a show_sls that must fail (a list of messages)."""
    assert res["rc"] != 0 and isinstance(res["out"], list), (
        f"{res['cmd']} rendered:\n{res['stdout'][:500]}")
    return res["out"]


def test_bad_pillar_stops_rendering_with_one_error_naming_the_key(variants):
    """What tests/lab/test_30_bad_pillar.py asserts on every node of the lab, here masterless:
    the execution module's CommandExecutionError becomes one render error."""
    errors = _render_errors(variants["bad-pillar"])
    assert len(errors) == 1, errors
    assert errors[0].count("apigee_mtls: invalid pillar: apigee_mtls:secrets:gossip_key:") == 1


@pytest.mark.parametrize("os_name", ["debian12", "oracle7"])
def test_lookup_overrides_the_os_parameters(renders, variants, os_name):
    """apigee_mtls:lookup merges last (template-formula's order): over defaults, os_family
    and osmajorrelease; what it does not name keeps the OS's value."""
    res = variants["lookup-" + os_name]
    assert res["rc"] == 0 and isinstance(res["out"], dict), res["stdout"][:500]
    states = res["out"]
    fun, args = _args(states["apigee-mtls-install-pkgs-installed"])
    assert args["pkgs"] == LOOKUP["pkgs"]
    _, args = _args(states["apigee-mtls-firewall-script-managed"])
    assert args["name"] == "/opt/site/apigee-fw"
    _, args = _args(states["apigee-mtls-firewall-chains-managed"])
    assert args["apply_cmd"] == "/opt/site/apigee-fw apply"
    _, args = _args(states["apigee-mtls-mesh-proxy-unit-managed"])
    assert args["context"]["start_limit_in_service"] is True
    # not overridden: the family's own
    want = EXPECTED[OSES[os_name]["os_family"]]
    users = [_args(st)[1] for st in states.values() if _args(st)[0] == "user.present"]
    assert users and all(u["shell"] == want["shell"] for u in users)
    # without a lookup, the family's packages (the same render, other pillar)
    plain = _states(renders, os_name, SIGNER, "apigee_mtls")
    assert _args(plain["apigee-mtls-install-pkgs-installed"])[1]["pkgs"] == want["pkgs"]


@pytest.mark.parametrize("name,family", [("suse", "Suse"), ("windows", "Windows")])
def test_an_unsupported_os_family_stops_rendering_naming_it(variants, name, family):
    errors = _render_errors(variants[name])
    assert len(errors) == 1, errors
    assert f"apigee_mtls: unsupported OS family {family} (grain os_family of n1)" in errors[0]
    assert "Debian and RedHat only" in errors[0]
