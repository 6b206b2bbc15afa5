"""Cutting a node off (issue 16): a node removed from the pillar keeps, on its peers, the
connections it had opened to their Consul and sidecar ports (intentions are checked only at
the TLS handshake). The peers' chains refuse its packets, established or not (test_plan.py);
the planner parses ss's output and picks the sockets to close."""

import apigee_mtls_plan as amp  # registered by conftest.py
from conftest import load_topology

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
