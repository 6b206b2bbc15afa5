"""Requests to the signer through Salt's event bus and the master's reactor
(``apigee_mtls.ask_signer`` -> ``apigee_mtls/request`` -> ``answer_request`` on the signer ->
``apigee_mtls/answer`` -> ``accept_answer`` on the requester), without a master: two copies of
the execution module play n5 (requester) and n1 (signer), and the formula's two reactor SLS
files are rendered by Salt's own Jinja renderer with the event data the master would fire
(``{"id": <the sender the master stamps>, "data": ...}``), their low data run by hand.
"""

import logging
import pathlib

import pytest
import salt.config
import salt.utils.templates
import yaml

from conftest import ROOT, load_salt_module

REACTOR = ROOT / "formula" / "apigee_mtls" / "reactor"
QUIET = logging.getLogger("apigee_mtls_requests.test")
QUIET.propagate = False
QUIET.addHandler(logging.NullHandler())
OPTS = dict(salt.config.minion_config(None), file_client="local")


def react(name, event):
    """The low data of reactor ``name`` (request or answer) for ``event``:
    ``(function, {kwarg: value}, tgt, tgt_type)``, or None when it renders nothing."""
    text = salt.utils.templates.render_jinja_tmpl(
        (REACTOR / f"{name}.sls").read_text(), {"data": event, "opts": OPTS,
                                                "saltenv": "base", "sls": ""})
    high = yaml.safe_load(text)
    if not high:
        return None
    (state,) = high.values()
    ((fun, params),) = state.items()
    flat = {k: v for item in params for k, v in item.items()}
    kwargs = {k: v for item in flat["args"] for k, v in item.items()}
    return fun, kwargs, flat["tgt"], flat["tgt_type"]


class Cluster:
    """n5 asks, n1 signs; ``forge`` replaces the sender the master stamps on the answer."""

    def __init__(self, tmp_path, monkeypatch):
        self.mods = {}
        self.events = []
        self.signed_for = []
        self.forge = None
        self.reactor = True
        for node in ("n1", "n5"):
            mod = load_salt_module("_modules", f"apigee_mtls_req_{node}")
            monkeypatch.setattr(mod, "log", QUIET)
            monkeypatch.setattr(mod, "__opts__", {"id": node,
                                                  "cachedir": str(tmp_path / node)},
                                raising=False)
            monkeypatch.setattr(mod, "__salt__", {
                "event.fire_master": (lambda data, tag, node=node: self.fire(node, data, tag))},
                raising=False)
            self.mods[node] = mod

        def sign(public_key=None, bundle_only=False, **kwargs):
            self.signed_for.append((kwargs.get("__pub_id"), public_key, bundle_only,
                                    kwargs.get("view")))
            return {"certificate": f"CERT {kwargs.get('__pub_id')}", "ca_bundle": "CA"}

        monkeypatch.setattr(self.mods["n1"], "sign_agent_certificate", sign)

    def fire(self, sender, data, tag):
        """The master: stamp the sender, run the reactor for the tag."""
        self.events.append((tag, sender, data))
        if not self.reactor:
            return True
        event = {"id": self.forge if tag.endswith("answer") and self.forge else sender,
                 "data": data, "cmd": "_minion_event", "tag": tag}
        low = react(tag.split("/")[-1], event)
        if low:
            fun, kwargs, tgt, tgt_type = low
            assert tgt_type == "list"
            for target in tgt.split(","):
                if target in self.mods:
                    getattr(self.mods[target], fun.split(".")[-1])(**kwargs)
        return True


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    return Cluster(tmp_path, monkeypatch)


def _left(cluster, node):
    folder = pathlib.Path(cluster.mods[node]._answers_dir())
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_round_trip_signs_for_the_id_the_master_stamped(cluster):
    answer = cluster.mods["n5"].ask_signer("sign_agent_certificate", signer="n1",
                                           public_key="PUB", view="v1", __pub_id="n2",
                                           CN="n1")
    assert answer == {"certificate": "CERT n5", "ca_bundle": "CA"}
    # the identity is the event's sender, never an argument; unknown arguments are dropped
    assert cluster.signed_for == [("n5", "PUB", False, "v1")]
    tags = [(tag, sender) for tag, sender, _ in cluster.events]
    assert tags == [("apigee_mtls/request", "n5"), ("apigee_mtls/answer", "n1")]
    assert set(cluster.events[0][2]["request"]) == {"public_key", "view"}
    assert _left(cluster, "n5") == []  # the answer and the pending marker are removed


def test_the_signer_answers_itself_without_an_event(cluster):
    answer = cluster.mods["n1"].ask_signer("sign_agent_certificate", signer="n1",
                                           public_key="PUB", bundle_only=True)
    assert answer["ca_bundle"] == "CA" and cluster.events == []


def test_an_answer_from_another_minion_is_not_taken(cluster):
    cluster.forge = "n3"  # n3 fires an apigee_mtls/answer event for n5's request
    answer = cluster.mods["n5"].ask_signer("sign_agent_certificate", signer="n1",
                                           public_key="PUB", timeout=0.5)
    assert isinstance(answer, str) and answer.startswith("no answer from n1 within 0.5 s")
    assert _left(cluster, "n5") == []


def test_without_the_reactor_the_answer_says_what_to_configure(cluster):
    cluster.reactor = False
    answer = cluster.mods["n5"].ask_signer("issue_acl_token", signer="n1", public_key="PUB",
                                           timeout=0.3)
    assert "apigee_mtls/request" in answer and "README, step 2" in answer
    assert _left(cluster, "n5") == []


def test_an_answer_to_no_pending_request_is_dropped(cluster):
    n5 = cluster.mods["n5"]
    assert n5.accept_answer("n1", "a" * 32, {"certificate": "X"}) is False
    assert n5.accept_answer("n1", "../../etc/passwd", {}) is False
    assert _left(cluster, "n5") == []


def test_answer_request_refuses_a_job_a_minion_published(cluster):
    n1 = cluster.mods["n1"]
    assert "reactor" in n1.answer_request("n5", "sign_agent_certificate", "a" * 32,
                                          __pub_id="n3")["error"]
    assert "not a request" in n1.answer_request("n5", "gossip_keygen", "a" * 32)["error"]
    assert "not a request" in n1.answer_request("n5", "issue_acl_token", "x/../y")["error"]
    assert cluster.signed_for == [] and cluster.events == []


def test_ask_signer_only_asks_for_the_two_functions(cluster):
    with pytest.raises(Exception, match="fun: the signer answers only"):
        cluster.mods["n5"].ask_signer("gossip_keygen", signer="n1")


@pytest.mark.parametrize("event", [
    {"data": {"signer": "n1", "fun": "issue_acl_token", "request_id": "a" * 32}},  # no id
    {"id": "n5", "data": {"signer": "n1", "fun": "cmd.run", "request_id": "a" * 32}},
    {"id": "n5", "data": {"signer": ["n1"], "fun": "issue_acl_token"}},
    {"id": "n5", "data": "not a mapping"},
])
def test_the_request_reactor_renders_nothing_for_other_events(event):
    assert react("request", event) is None


def test_the_answer_reactor_passes_the_stamped_sender():
    fun, kwargs, tgt, _ = react("answer", {"id": "n1", "data": {
        "requester": "n5", "request_id": "b" * 32, "answer": {"certificate": "C\n\"q\""},
        "sender": "forged"}})
    assert (fun, tgt) == ("local.apigee_mtls.accept_answer", "n5")
    assert kwargs == {"sender": "n1", "request_id": "b" * 32,
                      "answer": {"certificate": "C\n\"q\""}}
    assert react("answer", {"id": "n1", "data": {"request_id": "b" * 32}}) is None


def test_retries_back_off_with_jitter():
    states = load_salt_module("_states", "apigee_mtls_state_req")
    pauses = [[states._retry_pause(a) for a in range(6)] for _ in range(50)]
    for row in pauses:
        assert 1.5 <= row[0] <= 2.5 and 3 <= row[1] <= 5
        assert all(6 <= p <= 10 for p in row[2:])
    assert len({row[0] for row in pauses}) > 1  # not every node waits the same
