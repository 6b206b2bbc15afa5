"""Cutting a node off (issue 16): a node removed from the pillar keeps, on its peers, the
connections it had opened to their Consul and sidecar ports (intentions are checked only at
the TLS handshake). The peers' chains refuse its packets, established or not (test_plan.py),
and ``stale_connections_closed`` closes the sockets with ``ss -K``: the planner parses ss's
output and picks the sockets; the state is run against a simulated ss."""

import pytest

import apigee_mtls_plan as amp  # registered by conftest.py
from conftest import load_salt_module, load_topology

STATES = load_salt_module("_states", "apigee_mtls_states_stale")

#: what ``ss -tn state established`` prints on n1 (10.77.0.11) of the 5-node cluster: n1's
#: sidecar ports are 10001-10003 (zk ingress), 10100-10102 (cassandra), 10200 (ldap), 10700
#: (egress)
SS_OUTPUT = """\
Recv-Q Send-Q         Local Address:Port          Peer Address:Port Process
0      0                 10.77.0.11:10001           10.77.0.15:43210
0      0                 10.77.0.11:8300            10.77.0.12:52114
0      36       [::ffff:10.77.0.11]:8301    [::ffff:10.77.0.15]:38822
0      0                  127.0.0.1:8502             127.0.0.1:41876
0      0                      [::1]:8500                 [::1]:50220
0      0                 10.77.0.11:22               192.0.2.7:51234
0      0                 10.77.0.11:48022           10.77.0.15:10303
0      0          [2001:db8::11]%eth0:10700         [2001:db8::99]:40000
"""


def _sock(local, lport, peer, pport):
    return {"local_ip": local, "local_port": lport, "peer_ip": peer, "peer_port": pport}


def test_parser_reads_ipv4_ipv6_and_mapped_addresses():
    assert amp.parse_ss_established(SS_OUTPUT) == [
        _sock("10.77.0.11", 10001, "10.77.0.15", 43210),
        _sock("10.77.0.11", 8300, "10.77.0.12", 52114),
        _sock("::ffff:10.77.0.11", 8301, "::ffff:10.77.0.15", 38822),
        _sock("127.0.0.1", 8502, "127.0.0.1", 41876),
        _sock("::1", 8500, "::1", 50220),
        _sock("10.77.0.11", 22, "192.0.2.7", 51234),
        _sock("10.77.0.11", 48022, "10.77.0.15", 10303),
        _sock("2001:db8::11", 10700, "2001:db8::99", 40000),
    ]


def test_parser_takes_ss_without_header_with_a_state_column_or_unbracketed_ipv6():
    text = ("ESTAB 0 0 10.77.0.11:8300 10.77.0.12:52114\n"
            "0 0 ::ffff:10.77.0.11:8301 ::ffff:10.77.0.15:38822\n"
            "\n"
            "0 0 127.0.0.1%lo:8600 127.0.0.1:40000\n")
    assert amp.parse_ss_established(text) == [
        _sock("10.77.0.11", 8300, "10.77.0.12", 52114),
        _sock("::ffff:10.77.0.11", 8301, "::ffff:10.77.0.15", 38822),
        _sock("127.0.0.1", 8600, "127.0.0.1", 40000),
    ]
    assert amp.parse_ss_established("") == []
    assert amp.parse_ss_established("Recv-Q Send-Q Local Address:Port Peer Address:Port\n") == []


def _cut_off_n5():
    """n1's plan once n5 (10.77.0.15) left the pillar."""
    pillar = load_topology("5-node")
    pillar["nodes"] = [n for n in pillar["nodes"] if n["id"] != "n5"]
    return amp.plan(pillar, "n1")["firewall"]


def test_member_ports_and_members_come_from_the_plan():
    fw = amp.plan(load_topology("5-node"), "n1")["firewall"]
    assert fw["members"] == ["10.77.0.11", "10.77.0.12", "10.77.0.13", "10.77.0.14",
                             "10.77.0.15"]
    assert fw["member_ports"] == sorted(amp.CONSUL_PORTS | {
        10001, 10002, 10003, 10100, 10101, 10102, 10200, 10700})
    assert _cut_off_n5()["members"] == fw["members"][:4]


def test_rule_closes_only_non_members_on_policed_ports():
    fw = _cut_off_n5()
    stale = amp.stale_connections(amp.parse_ss_established(SS_OUTPUT), fw["member_ports"],
                                  fw["members"])
    assert stale == [
        # n5 on n1's zookeeper ingress sidecar, over IPv4 and IPv4-mapped IPv6 (gossip)
        _sock("10.77.0.11", 10001, "10.77.0.15", 43210),
        _sock("::ffff:10.77.0.11", 8301, "::ffff:10.77.0.15", 38822),
        # no member reaches a node over IPv6
        _sock("2001:db8::11", 10700, "2001:db8::99", 40000),
    ]
    # kept: a member (n2 on 8300), loopback (v4, v6), a non-member on a port the formula does
    # not police (SSH), and n1's own outgoing connection to n5 (its local port is ephemeral)


def test_rule_keeps_members_and_loopback_in_every_spelling():
    ports = [8301, 10001]
    keep = [_sock("10.77.0.11", 8301, "10.77.0.12", 1), _sock("::ffff:10.77.0.11", 8301,
                                                            "::ffff:10.77.0.12", 2),
            _sock("::ffff:127.0.0.1", 10001, "::ffff:127.0.0.1", 3),
            _sock("127.0.0.1", 10001, "127.0.0.2", 4), _sock("::1", 10001, "::1", 5)]
    assert amp.stale_connections(keep, ports, ["10.77.0.11", "10.77.0.12"]) == []
    assert amp.stale_connections(keep[:2], ports, ["10.77.0.11"]) == keep[:2]
    # a member given as IPv4-mapped IPv6 matches its IPv4 peer, and the reverse
    assert amp.stale_connections(keep[:2], ports, ["::ffff:10.77.0.12"]) == []
    assert amp.stale_connections(keep, [], []) == []


def test_kill_filter_names_both_ends():
    assert amp.ss_kill_args(_sock("10.77.0.11", 10001, "10.77.0.15", 43210)) == [
        "ss", "-K", "-tn", "state", "established", "dst", "10.77.0.15", "dport", "=",
        ":43210", "src", "10.77.0.11", "sport", "=", ":10001"]
    assert amp.ss_kill_args(_sock("::ffff:10.77.0.11", 8301, "::ffff:10.77.0.15", 38822))[5:] \
        == ["dst", "[::ffff:10.77.0.15]", "dport", "=", ":38822",
            "src", "[::ffff:10.77.0.11]", "sport", "=", ":8301"]
    assert amp.connection_label(_sock("::ffff:10.77.0.11", 8301, "::ffff:10.77.0.15", 38822)) \
        == "[::ffff:10.77.0.15]:38822 -> :8301"


# --------------------------------------------------------------------------------------------
# the state, against a simulated ss
class FakeSS:
    """ss over a list of established sockets: ``-K`` removes the socket its filter names
    (unless ``stuck``: what a kernel without SOCK_DESTROY does, silently) or fails with
    ``error``."""

    def __init__(self, text=SS_OUTPUT):
        self.sockets = amp.parse_ss_established(text)
        self.kills, self.stuck, self.error, self.list_error = [], False, None, None

    def run_all(self, cmd, python_shell=True, ignore_retcode=False):
        assert python_shell is False and isinstance(cmd, list), cmd
        header = "Recv-Q Send-Q Local Address:Port Peer Address:Port Process\n"
        if cmd == STATES.SS_ESTABLISHED:
            if self.list_error:
                return {"retcode": 1, "stdout": "", "stderr": self.list_error}
            return {"retcode": 0, "stderr": "", "stdout": header + "".join(
                "0 0 {} {}\n".format(amp._ss_host(s["local_ip"], s["local_port"]),
                                     amp._ss_host(s["peer_ip"], s["peer_port"]))
                for s in self.sockets)}
        assert cmd[:5] == ["ss", "-K", "-tn", "state", "established"], cmd
        self.kills.append(cmd)
        if self.error:
            return {"retcode": 1, "stdout": "", "stderr": self.error}
        closed = [s for s in self.sockets if amp.ss_kill_args(s) == cmd]
        if not self.stuck:
            self.sockets = [s for s in self.sockets if s not in closed]
        return {"retcode": 0, "stderr": "", "stdout": header}


@pytest.fixture
def ss(monkeypatch):
    fake = FakeSS()
    utils = {f"apigee_mtls_plan.{name}": getattr(amp, name) for name in (
        "parse_ss_established", "stale_connections", "connection_label", "ss_kill_args")}
    monkeypatch.setattr(STATES, "__utils__", utils, raising=False)
    monkeypatch.setattr(STATES, "__salt__", {"cmd.run_all": fake.run_all}, raising=False)
    monkeypatch.setattr(STATES, "__opts__", {"id": "n1", "test": False}, raising=False)
    return fake


def _apply():
    fw = _cut_off_n5()
    return STATES.stale_connections_closed("stale", fw["member_ports"], fw["members"])


CLOSED = ["10.77.0.15:43210 -> :10001", "[2001:db8::99]:40000 -> :10700",
          "[::ffff:10.77.0.15]:38822 -> :8301"]


def test_test_mode_closes_nothing_and_says_what_it_would(ss):
    STATES.__opts__["test"] = True
    ret = _apply()
    assert ret["result"] is None
    assert ret["changes"] == {"closed": CLOSED}
    assert ret["comment"] == "Would close 3 connection(s) from non-members: " + ", ".join(CLOSED)
    assert ss.kills == [] and len(ss.sockets) == 8


def test_closing_runs_ss_kill_with_the_exact_filter(ss):
    ret = _apply()
    assert ret["result"] is True, ret
    assert ret["changes"] == {"closed": CLOSED}
    assert ret["comment"] == "Closed 3 connection(s) from non-members: " + ", ".join(CLOSED)
    assert ss.kills[0] == ["ss", "-K", "-tn", "state", "established", "dst", "10.77.0.15",
                           "dport", "=", ":43210", "src", "10.77.0.11", "sport", "=", ":10001"]
    assert ss.kills[1][5:] == ["dst", "[::ffff:10.77.0.15]", "dport", "=", ":38822",
                               "src", "[::ffff:10.77.0.11]", "sport", "=", ":8301"]
    assert len(ss.kills) == 3
    # the members', loopback's, SSH's and n1's own outgoing connections are untouched
    assert [s["peer_port"] for s in ss.sockets] == [52114, 41876, 50220, 51234, 10303]
    # a rerun has nothing left to close
    again = _apply()
    assert (again["result"], again["changes"]) == (True, {})
    assert again["comment"] == "No connection from a non-member on Consul or sidecar ports"


def test_an_ss_failure_is_a_failure_with_its_error(ss):
    ss.error = "SOCK_DESTROY answers: Operation not permitted"
    ret = _apply()
    assert ret["result"] is False
    assert ret["changes"] == {}
    assert ret["comment"].startswith("Could not close 3 of 3 connection(s) from non-members: "
                                     "10.77.0.15:43210 -> :10001: SOCK_DESTROY answers: "
                                     "Operation not permitted")


def test_a_socket_the_kernel_did_not_close_is_a_failure(ss):
    ss.stuck = True  # ss -K succeeds but skips the socket (no CONFIG_INET_DIAG_DESTROY)
    ret = _apply()
    assert ret["result"] is False and ret["changes"] == {}
    assert "10.77.0.15:43210 -> :10001: still open after ss -K" in ret["comment"]


def test_what_ss_said_names_why_a_socket_stayed_open(ss):
    ss.stuck = True
    real = ss.run_all

    def run_all(cmd, **kwargs):
        out = real(cmd, **kwargs)
        if "-K" in cmd:
            out["stderr"] = "SOCK_DESTROY answers: Operation not permitted"
        return out

    STATES.__salt__["cmd.run_all"] = run_all
    ret = _apply()
    assert ret["result"] is False
    assert ("10.77.0.15:43210 -> :10001: still open after ss -K (SOCK_DESTROY answers: "
            "Operation not permitted)") in ret["comment"]


def test_ss_missing_is_a_failure_not_an_exception(ss):
    def run_all(cmd, **kwargs):
        raise STATES.CommandExecutionError("Unable to run command ['ss']: No such file")

    STATES.__salt__["cmd.run_all"] = run_all
    ret = _apply()
    assert ret["result"] is False and ret["changes"] == {}
    assert ret["comment"] == ("ss -tn state established failed: Unable to run command "
                              "['ss']: No such file")


def test_a_failed_listing_is_a_failure(ss):
    ss.list_error = "ss: command not found"
    ret = _apply()
    assert ret["result"] is False and ret["changes"] == {}
    assert ret["comment"] == "ss -tn state established failed: ss: command not found"


def test_nothing_to_close_is_success_without_changes(ss):
    ss.sockets = [s for s in ss.sockets if s["peer_ip"] in ("10.77.0.12", "127.0.0.1")]
    ret = _apply()
    assert ret == {"name": "stale", "result": True, "changes": {},
                   "comment": "No connection from a non-member on Consul or sidecar ports"}
    assert ss.kills == []
