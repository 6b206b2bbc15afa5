"""The IPv6 firewall (issue 11): the mesh runs on IPv4, so over IPv6 the formula refuses the
cluster's component ports in both directions, in chains of its own, and never touches
ICMPv6."""

import pytest

IN = "-A APIGEE-MTLS-IN "
OUT = "-A APIGEE-MTLS-OUT "
RESET = " -j REJECT --reject-with tcp-reset"
# every meshed component port of the 5-node cluster (Cassandra 7000 included: internode on)
CLUSTER_PORTS = "2181,2888,3888,4527,4528,4530,5432,5672,7000,8081:8084,9042,9160,10389"


def _cluster_ports(amp, pillar):
    model = amp.normalize(pillar)
    return sorted({p for n in model["nodes"] if not n["retired"]
                   for c in n["components"] for p in model["components"][c]["ports"]})


def _dports(rule):
    """The ports a ``--dport``/``--dports`` rule names, ranges expanded."""
    words = rule.split()
    spec = words[words.index("--dports" if "--dports" in words else "--dport") + 1]
    ports = set()
    for item in spec.split(","):
        low, _, high = item.partition(":")
        ports.update(range(int(low), int(high or low) + 1))
    return ports


def test_ipv6_rules_of_a_5_node_router_node(amp, topo5):
    ip6 = amp.plan(topo5, "n2")["firewall"]["ip6"]
    assert ip6["input"] == [
        IN + "-i lo -j RETURN",
        IN + "-p tcp -m multiport --dports 22,4505,4506 -j RETURN",
        # Consul's TCP ports and n2's own sidecars (zk, cass, mp, rt ingress; egress 10701),
        # refused before the ESTABLISHED RETURN, as over IPv4 (issue 16)
        IN + "-p tcp -m multiport --dports 8300:8302,8500:8503,8600,10004:10006,"
             "10103:10105,10500,10501,10600,10601,10701" + RESET,
        IN + "-p udp -m multiport --dports 8301,8302,8600 -j DROP",
        IN + "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        IN + "-p tcp -m multiport --dports " + CLUSTER_PORTS + RESET,
    ]
    assert ip6["output"] == [
        OUT + "-o lo -j RETURN",
        OUT + "-p tcp -m multiport --dports 22,4505,4506 -j RETURN",
        OUT + "-p tcp -m multiport --dports " + CLUSTER_PORTS + RESET,
    ]


def test_render_ip6tables_restore(amp, topo5):
    firewall = amp.plan(topo5, "n4")["firewall"]
    lines = amp.render_ip6tables_restore(firewall).splitlines()
    assert lines[:3] == ["*filter", ":APIGEE-MTLS-IN - [0:0]", ":APIGEE-MTLS-OUT - [0:0]"]
    assert lines[3:-1] == firewall["ip6"]["input"] + firewall["ip6"]["output"]
    assert lines[-1] == "COMMIT"
    # IPv4's payload is unchanged by the IPv6 part: no *filter rule leaks into it
    assert not set(firewall["ip6"]["output"]) & set(
        amp.render_iptables_restore(firewall).splitlines())


def test_ipv6_false_gives_no_ipv6_plan(amp, topo5):
    topo5["firewall"] = {"ipv6": False}
    assert amp.normalize(topo5)["firewall"] == {"protected_ports": [22, 4505, 4506],
                                                "ipv6": False}
    for node in ("n1", "n4"):
        firewall = amp.plan(topo5, node)["firewall"]
        assert firewall["ip6"] is None
        assert amp.render_ip6tables_restore(firewall) is None
        assert firewall["nat"] and firewall["filter"]  # IPv4 is still managed


def test_ipv6_defaults_to_on(amp, topo5):
    assert amp.normalize(topo5)["firewall"]["ipv6"] is True
    topo5["firewall"] = {"ipv6": True, "protected_ports": [22]}
    assert amp.plan(topo5, "n1")["firewall"]["ip6"]["input"]


def test_lockdown_gates_the_ipv6_component_refusals_only(amp, any_topology):
    """lockdown=False (the rollout's redirect stage) drops exactly the component-port REJECTs,
    in both chains; Consul and sidecar ports stay refused over IPv6 in every stage."""
    cluster = set(_cluster_ports(amp, any_topology))
    for node in amp.normalize(any_topology)["nodes"][:4]:
        full = amp.plan(any_topology, node["id"])["firewall"]["ip6"]
        staged = amp.plan(any_topology, node["id"], lockdown=False)["firewall"]["ip6"]
        for chain in ("input", "output"):
            dropped = [r for r in full[chain] if r not in staged[chain]]
            assert dropped and all("REJECT" in r and _dports(r) <= cluster for r in dropped)
            assert set().union(*(_dports(r) for r in dropped)) == cluster
            assert [r for r in full[chain] if r not in dropped] == staged[chain]
        assert any("8300" in r and "REJECT" in r for r in staged["input"])


def test_protected_ports_come_before_any_reject(amp, any_topology):
    any_topology["firewall"] = {"protected_ports": [22, 2222, 4505, 4506]}
    for node in amp.normalize(any_topology)["nodes"]:
        ip6 = amp.plan(any_topology, node["id"])["firewall"]["ip6"]
        for chain in ("input", "output"):
            rules = ip6[chain]
            protected = max(i for i, r in enumerate(rules)
                            if "--dport" in r and _dports(r) & {22, 2222})
            first_refusal = min(i for i, r in enumerate(rules)
                                if "REJECT" in r or "DROP" in r)
            assert protected < first_refusal, (node["id"], chain)
            assert "2222" in rules[protected] and rules[protected].endswith("-j RETURN")
            for rule in rules[first_refusal:]:
                if rule == IN + "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN":
                    continue
                assert "--dport" in rule and not _dports(rule) & {22, 2222, 4505, 4506}, rule


def test_no_icmpv6_rule_and_no_redirect(amp, any_topology):
    """Neighbour discovery must never be touched: every refusal names tcp or udp."""
    for node in amp.normalize(any_topology)["nodes"]:
        ip6 = amp.plan(any_topology, node["id"])["firewall"]["ip6"]
        for rule in ip6["input"] + ip6["output"]:
            assert "icmp" not in rule.lower(), rule
            assert "REDIRECT" not in rule and "DNAT" not in rule, rule
            if "REJECT" in rule or "DROP" in rule:
                assert " -p tcp " in rule or " -p udp " in rule, rule


def test_every_cluster_component_port_is_refused_in_both_directions(amp, any_topology):
    """Even a node with none of a component refuses its ports: a component dialling a peer's
    IPv6 address fails fast, and nothing reaches a component port in plaintext over IPv6."""
    cluster = set(_cluster_ports(amp, any_topology))
    for node in amp.normalize(any_topology)["nodes"]:
        ip6 = amp.plan(any_topology, node["id"])["firewall"]["ip6"]
        for chain in ("input", "output"):
            refused = set().union(*(_dports(r) for r in ip6[chain]
                                    if r.endswith(RESET) and " -p tcp " in r))
            assert cluster <= refused, (node["id"], chain, sorted(cluster - refused))


def test_consul_udp_gossip_is_dropped_and_tcp_refused_over_ipv6(amp, topo5):
    rules = amp.plan(topo5, "n1")["firewall"]["ip6"]["input"]
    udp = [r for r in rules if " -p udp " in r]
    assert udp == [IN + "-p udp -m multiport --dports 8301,8302,8600 -j DROP"]
    tcp_refused = set().union(*(_dports(r) for r in rules if r.endswith(RESET)))
    assert {8300, 8301, 8302, 8500, 8501, 8502, 8503, 8600} <= tcp_refused
    ports = amp.plan(topo5, "n1")["ports"]
    sidecars = {ports["egress"]} | {p for b in ports["ingress"].values() for p in b.values()}
    assert sidecars <= tcp_refused


@pytest.mark.parametrize("internode", [True, False])
def test_cassandra_7000_follows_internode(amp, topo5, internode):
    topo5["cassandra_internode"] = internode
    out = amp.plan(topo5, "n4")["firewall"]["ip6"]["output"]
    refused = set().union(*(_dports(r) for r in out if r.endswith(RESET)))
    assert (7000 in refused) is internode
    assert {9042, 9160, 2181} <= refused


def test_retired_node_gets_empty_ipv6_chains(amp, topo5):
    topo5["nodes"][4]["retired"] = True
    assert amp.plan(topo5, "n5")["firewall"]["ip6"] == {"input": [], "output": []}


def test_consul_and_sidecar_ports_are_refused_before_established(amp, any_topology):
    """Issue 16, over IPv6: Consul's and the node's sidecar ports are refused before the
    ESTABLISHED RETURN (no member reaches them over IPv6: an open connection ends too); the
    component ports only after it, as over IPv4."""
    established = IN + "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"
    cluster = set(_cluster_ports(amp, any_topology))
    for node in amp.normalize(any_topology)["nodes"]:
        plan = amp.plan(any_topology, node["id"])
        rules = plan["firewall"]["ip6"]["input"]
        if node["retired"]:
            assert rules == []
            continue
        cut = rules.index(established)
        before = set().union(*(_dports(r) for r in rules[:cut] if r.endswith(RESET)))
        assert before == set(plan["firewall"]["member_ports"])
        assert not before & cluster
        after = set().union(*(_dports(r) for r in rules[cut + 1:]))
        assert after == cluster
