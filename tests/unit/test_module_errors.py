"""The execution module's CLI contract (``_modules/apigee_mtls.py``): bad input, a bad pillar
included, makes every public function raise ``CommandExecutionError`` with one line (Salt
prints it and exits non-zero) instead of returning an error dict with exit code 0. The
functions that answer other minions' requests keep answering with ``{"error": ...}`` dicts,
which the requesting states parse."""

import inspect

import pytest
from salt.exceptions import CommandExecutionError

import apigee_mtls_plan as amp  # registered by conftest.py
from conftest import load_salt_module, load_topology

MODULE = load_salt_module("_modules", "apigee_mtls_module_errors")
BAD_KEY = "apigee_mtls:secrets:gossip_key"


@pytest.fixture
def pillars(monkeypatch):
    """``{"apigee_mtls": ..., "apigee_mtls_rollout:stage": ...}``: what ``pillar.get`` answers;
    the apigee_mtls pillar starts with a bad gossip key."""
    pillar = load_topology("5-node")
    pillar["secrets"]["gossip_key"] = "not-base64!"
    values = {"apigee_mtls": pillar, "apigee_mtls_rollout:stage": None}
    monkeypatch.setattr(MODULE, "__utils__", {
        "apigee_mtls_plan." + name: getattr(amp, name) for name in (
            "normalize", "plan", "intentions", "port_report", "render_iptables_restore",
            "render_ip6tables_restore", "gossip_keygen", "ca_file_names",
            "ca_file_generation")}, raising=False)
    monkeypatch.setattr(MODULE, "__salt__", {
        "pillar.get": lambda key, default=None, unmask=False: values.get(key, default),
        "cmd.run_all": lambda *a, **k: pytest.fail("ran a command on bad input"),
        "cmd.which": lambda name: None}, raising=False)
    monkeypatch.setattr(MODULE, "__opts__", {"id": "n1"}, raising=False)
    monkeypatch.setattr(MODULE, "__context__", {}, raising=False)
    return values


def _raises(call, *fragments):
    with pytest.raises(CommandExecutionError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, text
    return text


BAD_PILLAR = ("apigee_mtls: invalid pillar: " + BAD_KEY + ":",)

#: public function -> calls with bad input (each raises CommandExecutionError naming it)
CASES = {
    "validate": [(lambda: MODULE.validate(), BAD_PILLAR),
                 (lambda: MODULE.validate({"nodes": "n1"}), ("apigee_mtls:nodes",))],
    "plan": [(lambda: MODULE.plan(), BAD_PILLAR),
             (lambda: MODULE.plan(secrets="yes"), ("secrets",)),
             (lambda: MODULE.plan(lockdown="no"), ("lockdown",)),
             (lambda: MODULE.plan(node_id=7), ("node_id",))],
    "intentions": [(lambda: MODULE.intentions(), BAD_PILLAR)],
    "ask_signer": [(lambda: MODULE.ask_signer("issue_acl_token"), BAD_PILLAR),
                   (lambda: MODULE.ask_signer("cmd.run", signer="n1"), ("fun:",))],
    "ports": [(lambda: MODULE.ports(), BAD_PILLAR)],
    "report": [(lambda: MODULE.report(), BAD_PILLAR)],
    "ca_ready": [(lambda: MODULE.ca_ready(), BAD_PILLAR),
                 (lambda: MODULE.ca_ready(["one"]), ("generations",)),
                 (lambda: MODULE.ca_ready([0]), ("generations",))],
    "ca_files": [(lambda: MODULE.ca_files("relative/dir"), ("ca_dir",))],
    "management_token_file": [(lambda: MODULE.management_token_file(), BAD_PILLAR)],
    "chain_drifted": [(lambda: MODULE.chain_drifted({}), ("status",)),
                      (lambda: MODULE.chain_drifted("APIGEE-MTLS-IN"), ("status",))],
    "firewall_status": [(lambda: MODULE.firewall_status(), BAD_PILLAR),
                        (lambda: MODULE.firewall_status("plan"), ("node_plan",))],
    "probe_upstream": [(lambda: MODULE.probe_upstream(0), ("port",)),
                       (lambda: MODULE.probe_upstream("10001"), ("port",)),
                       (lambda: MODULE.probe_upstream(10001, address="localhost"),
                        ("address",)),
                       (lambda: MODULE.probe_upstream(10001, timeout=0), ("timeout",))],
    "verify": [(lambda: MODULE.verify(), BAD_PILLAR),
               (lambda: MODULE.verify(probe_timeout=0), ("probe_timeout",)),
               (lambda: MODULE.verify(http_port=70000), ("http_port",)),
               (lambda: MODULE.verify(firewall="off"), ("firewall",)),
               (lambda: MODULE.verify(summary="yes"), ("summary",))],
}
#: functions without input (nothing to get wrong) and the peer-published ones (dict protocol)
NO_INPUT = {"gossip_keygen", "ipv6_skip_reason", "rollout_stage"}
PEER = {"sign_agent_certificate", "issue_acl_token", "answer_request", "accept_answer"}


def _public():
    return {name for name, obj in vars(MODULE).items()
            if inspect.isfunction(obj) and obj.__module__ == MODULE.__name__
            and not name.startswith("_")}


def test_every_public_function_has_a_case():
    assert _public() == set(CASES) | NO_INPUT | PEER
    for name in NO_INPUT - {"rollout_stage"}:
        assert not inspect.signature(getattr(MODULE, name)).parameters, name


@pytest.mark.parametrize("case", [(name, i) for name in CASES for i in range(len(CASES[name]))],
                         ids=lambda case: f"{case[0]}-{case[1]}")
def test_bad_input_raises_one_line(pillars, case):
    call, fragments = CASES[case[0]][case[1]]
    _raises(call, *fragments)
    assert "retcode" not in MODULE.__context__


def test_the_same_calls_work_with_a_good_pillar(pillars):
    pillars["apigee_mtls"]["secrets"]["gossip_key"] = amp.gossip_keygen()
    assert MODULE.validate()["secrets"] == "<hidden>"
    assert MODULE.plan()["member"] is True
    assert MODULE.plan("not-a-node") == {"member": False, "node_id": "not-a-node"}
    assert MODULE.intentions()[0]["action"] == "deny"
    assert "n1" in MODULE.ports() and MODULE.report() == MODULE.ports()
    assert MODULE.management_token_file() == "/etc/consul.d/acl/management.token"


def test_ca_files_on_a_file_raises_and_on_a_missing_dir_is_empty(pillars, tmp_path):
    assert MODULE.ca_files(str(tmp_path / "absent")) == []
    (tmp_path / "file").write_text("not a directory\n")
    _raises(lambda: MODULE.ca_files(str(tmp_path / "file")), "ca_dir", "file")


def test_rollout_stage_names_the_key(pillars):
    assert MODULE.rollout_stage() == "full"
    pillars["apigee_mtls_rollout:stage"] = "everything"
    _raises(MODULE.rollout_stage, "apigee_mtls_rollout:stage", "'everything'",
            "agents, mesh, redirect, full")
    # plan() asks for the stage when lockdown is not given: the same error
    pillars["apigee_mtls"]["secrets"]["gossip_key"] = amp.gossip_keygen()
    _raises(MODULE.plan, "apigee_mtls_rollout:stage")
    assert MODULE.plan(lockdown=True)["lockdown"] is True


def test_peer_functions_answer_a_bad_pillar_with_an_error_dict(pillars):
    """Other minions' states parse these answers: no exception crosses the request."""
    for fun in (MODULE.sign_agent_certificate, MODULE.issue_acl_token):
        answer = fun("PUBLIC KEY", __pub_id="n4")
        assert answer["key"] == BAD_KEY and answer["error"].startswith(BAD_KEY + ":")
