"""firewall_managed and firewall_status/verify's drift rule with IPv6 (issue 11), against a
simulated iptables/ip6tables: preview exactly with test=True, converge, 0 changes on a rerun,
report a hand-deleted IPv6 rule, skip a host without IPv6 with a comment, remove the
formula's leftovers when firewall:ipv6 is turned off."""

import pytest

import apigee_mtls_plan as amp  # registered by conftest.py
from conftest import load_salt_module, load_topology

MODULE = load_salt_module("_modules", "apigee_mtls_module_fw6")
STATES = load_salt_module("_states", "apigee_mtls_states_fw6")
APPLY = "/usr/local/sbin/apigee-mtls-firewall apply"
NODE = "n2"


class FakeNetfilter:
    """Live chains ``{(binary, table, chain): [rules]}`` and jumps ``{(binary, table,
    parent, chain)}``; ``apply`` does what the firewall script does with the plan."""

    def __init__(self, plan, ipv6=True):
        self.plan, self.ipv6 = plan, ipv6
        self.chains, self.jumps, self.applied, self.env = {}, set(), 0, None

    def run_all(self, cmd, python_shell=False, ignore_retcode=False, env=None):
        if cmd == APPLY:
            self.applied += 1
            self.env = env
            self.apply()
            return {"retcode": 0, "stdout": "", "stderr": ""}
        binary, _, _, table, op, *rest = cmd
        if op == "-S":
            rules = self.chains.get((binary, table, rest[0]))
            if rules is None:
                return {"retcode": 1, "stdout": "", "stderr": "No chain"}
            return {"retcode": 0, "stdout": "\n".join(["-N " + rest[0]] + rules), "stderr": ""}
        ok = (binary, table, rest[0], rest[2]) in self.jumps
        return {"retcode": 0 if ok else 1, "stdout": "", "stderr": ""}

    def apply(self):
        fw = self.plan["firewall"]
        self._set("iptables", "nat", "APIGEE-MTLS-OUT", "OUTPUT", fw["nat"])
        self._set("iptables", "filter", "APIGEE-MTLS-IN", "INPUT", fw["filter"])
        if not self.ipv6:
            return
        if fw["ip6"] is None:
            for chain in ("APIGEE-MTLS-IN", "APIGEE-MTLS-OUT"):
                self.chains.pop(("ip6tables", "filter", chain), None)
            self.jumps = {j for j in self.jumps if j[0] != "ip6tables"}
            return
        self._set("ip6tables", "filter", "APIGEE-MTLS-IN", "INPUT", fw["ip6"]["input"])
        self._set("ip6tables", "filter", "APIGEE-MTLS-OUT", "OUTPUT", fw["ip6"]["output"])

    def _set(self, binary, table, chain, parent, rules):
        self.chains[(binary, table, chain)] = list(rules)
        self.jumps.add((binary, table, parent, chain))


@pytest.fixture
def wire(monkeypatch):
    def make(pillar=None, ipv6=True, test=False):
        pillar = pillar or load_topology("5-node")
        plan = amp.plan(pillar, NODE)
        plan.update(member=True, lockdown=True,
                    ip6tables_restore=amp.render_ip6tables_restore(plan["firewall"]))
        net = FakeNetfilter(plan, ipv6)
        monkeypatch.setattr(MODULE, "__salt__", {"cmd.run_all": net.run_all}, raising=False)
        monkeypatch.setattr(MODULE, "ipv6_skip_reason",
                            lambda: None if ipv6 else "IPv6 disabled")
        monkeypatch.setattr(STATES, "__salt__", {
            "apigee_mtls.plan": lambda: plan,
            "apigee_mtls.firewall_status": MODULE.firewall_status,
            "cmd.run_all": net.run_all,
        }, raising=False)
        monkeypatch.setattr(STATES, "__opts__", {"id": NODE, "test": test}, raising=False)
        return net

    return make


def _managed():
    return STATES.firewall_managed("fw", "/etc/apigee-mtls/iptables.rules", APPLY,
                                   "/etc/apigee-mtls/ip6tables.rules")


def test_preview_then_apply_then_rerun_with_0_changes(wire):
    net = wire(test=True)
    preview = _managed()
    assert preview["result"] is None and preview["comment"].startswith("Would rebuild")
    assert set(preview["changes"]) == {"APIGEE-MTLS-OUT", "APIGEE-MTLS-IN",
                                       "ip6:APIGEE-MTLS-IN", "ip6:APIGEE-MTLS-OUT"}
    assert preview["changes"]["ip6:APIGEE-MTLS-OUT"] == {
        "chain": "create", "rules": 3, "jump": "OUTPUT -> APIGEE-MTLS-OUT"}
    assert net.applied == 0 and not net.chains
    STATES.__opts__["test"] = False
    real = _managed()
    assert real["result"] is True and real["changes"] == preview["changes"]
    assert "ip6tables.rules" in real["comment"]
    assert net.applied == 1
    rerun = _managed()
    assert rerun == {"name": "fw", "result": True, "changes": {},
                     "comment": "Firewall chains match the plan"}
    assert net.applied == 1


def test_a_hand_deleted_ipv6_rule_is_drift_and_is_restored(wire):
    net = wire()
    net.apply()
    key = ("ip6tables", "filter", "APIGEE-MTLS-IN")
    gone = net.chains[key].pop(3)
    status = MODULE.firewall_status(net.plan)
    assert [k for k, st in status.items() if MODULE.chain_drifted(st)] == ["ip6:APIGEE-MTLS-IN"]
    assert MODULE._ipv6_word(status) == "checked"
    ret = _managed()
    assert ret["changes"] == {"ip6:APIGEE-MTLS-IN": {"added": [gone], "removed": []}}
    assert gone in net.chains[key]
    assert _managed()["changes"] == {}


def test_a_missing_ipv6_jump_or_extra_rule_is_drift(wire):
    net = wire()
    net.apply()
    net.jumps.discard(("ip6tables", "filter", "OUTPUT", "APIGEE-MTLS-OUT"))
    net.chains[("ip6tables", "filter", "APIGEE-MTLS-IN")].append(
        "-A APIGEE-MTLS-IN -p tcp -m tcp --dport 80 -j ACCEPT")
    ret = STATES.firewall_managed("fw", "r", APPLY, "r6")
    assert ret["changes"]["ip6:APIGEE-MTLS-OUT"] == {"jump": "OUTPUT -> APIGEE-MTLS-OUT"}
    assert ret["changes"]["ip6:APIGEE-MTLS-IN"]["removed"] == [
        "-A APIGEE-MTLS-IN -p tcp -m tcp --dport 80 -j ACCEPT"]


def test_host_without_ipv6_is_skipped_with_a_comment_not_a_failure(wire):
    net = wire(ipv6=False)
    ret = _managed()
    assert ret["result"] is True
    assert set(ret["changes"]) == {"APIGEE-MTLS-OUT", "APIGEE-MTLS-IN"}
    assert "IPv6 firewall skipped: IPv6 disabled" in ret["comment"]
    rerun = _managed()
    assert rerun["result"] is True and rerun["changes"] == {}
    assert rerun["comment"] == ("Firewall chains match the plan; "
                                "IPv6 firewall skipped: IPv6 disabled")
    status = MODULE.firewall_status(net.plan)
    assert not any(MODULE.chain_drifted(st) for st in status.values())
    assert MODULE._ipv6_word(status) == "skipped: IPv6 disabled"


def test_ipv6_false_removes_only_the_formulas_leftovers(wire):
    pillar = load_topology("5-node")
    net = wire()
    net.apply()  # an earlier run with firewall:ipv6 true
    pillar["firewall"] = {"ipv6": False}
    net.plan.update(amp.plan(pillar, NODE))
    status = MODULE.firewall_status(net.plan)
    assert MODULE._ipv6_word(status) == "not managed (apigee_mtls:firewall:ipv6 is false)"
    assert MODULE.chain_drifted(status["ip6:APIGEE-MTLS-IN"])
    ret = _managed()
    assert ret["changes"] == {"ip6:APIGEE-MTLS-IN": {"chain": "remove"},
                              "ip6:APIGEE-MTLS-OUT": {"chain": "remove"}}
    assert not [k for k in net.chains if k[0] == "ip6tables"]
    assert _managed()["changes"] == {}
    assert not any(MODULE.chain_drifted(st) for st in MODULE.firewall_status(net.plan).values())


def test_the_script_applies_the_states_rules_files(wire):
    """The script reads the files the state names (APIGEE_MTLS_RULES/RULES6), not its own
    defaults; no IPv6 rules file (firewall:ipv6 false) is an empty RULES6."""
    net = wire()
    STATES.firewall_managed("fw", "/srv/r4", APPLY, "/srv/r6")
    assert net.env == {"APIGEE_MTLS_RULES": "/srv/r4", "APIGEE_MTLS_RULES6": "/srv/r6"}
    pillar = load_topology("5-node")
    pillar["firewall"] = {"ipv6": False}
    net.plan.update(amp.plan(pillar, NODE))
    net.chains.clear()
    ret = STATES.firewall_managed("fw", "/srv/r4", APPLY)
    assert ret["result"] is True and ret["comment"].endswith("from /srv/r4")
    assert net.env == {"APIGEE_MTLS_RULES": "/srv/r4", "APIGEE_MTLS_RULES6": ""}


def test_ipv6_rules_without_a_rules6_file_fail(wire):
    net = wire()
    ret = STATES.firewall_managed("fw", "/srv/r4", APPLY)
    assert ret["result"] is False and "rules6_file" in ret["comment"]
    assert net.applied == 0


def test_the_firewall_argument_replaces_the_pillar(wire):
    net = wire()
    STATES.__salt__["apigee_mtls.plan"] = lambda: pytest.fail("read the pillar")
    ret = STATES.firewall_managed("fw", "/srv/r4", APPLY, "/srv/r6", firewall=net.plan["firewall"])
    assert ret["result"] is True and net.applied == 1
    assert STATES.firewall_managed("fw", "/srv/r4", APPLY, "/srv/r6",
                                   firewall=net.plan["firewall"])["changes"] == {}
