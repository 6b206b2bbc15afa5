"""Unit tests of the pure planner ``_utils/apigee_mtls_plan.py``."""

import base64
import copy
import json
import pickle
import re

import pytest
import yaml

import apigee_mtls_plan as amp  # registered by conftest.py
from conftest import BAD_PILLARS, TOPOLOGY_NAMES, load_topology

GOSSIP = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="
IN = "-A APIGEE-MTLS-IN "
OUT = "-A APIGEE-MTLS-OUT "


def minimal(**extra):
    """Smallest valid pillar: three zookeeper nodes."""
    pillar = {
        "nodes": [
            {"id": "n1", "ip": "10.77.0.11", "components": ["zookeeper"]},
            {"id": "n2", "ip": "10.77.0.12", "components": ["zookeeper"]},
            {"id": "n3", "ip": "10.77.0.13", "components": ["zookeeper"]},
        ],
        "secrets": {"gossip_key": GOSSIP},
    }
    pillar.update(extra)
    return pillar


def node_by_id(pillar, node_id):
    return next(n for n in pillar["nodes"] if n["id"] == node_id)


def all_plans(pillar):
    return {n["id"]: amp.plan(pillar, n["id"]) for n in pillar["nodes"]}


def multiport_cost(spec):
    return sum(2 if ":" in item else 1 for item in spec.split(","))


def expand(spec):
    ports = set()
    for item in spec.split(","):
        if ":" in item:
            low, high = (int(x) for x in item.split(":"))
            ports.update(range(low, high + 1))
        else:
            ports.add(int(item))
    return ports


# ---------------------------------------------------------------------------
# Catalog
# ---------------------------------------------------------------------------

def test_catalog_matches_the_design():
    comps = amp.COMPONENTS
    assert list(comps) == ["management-server", "router", "message-processor", "qpid",
                           "postgres", "zookeeper", "cassandra", "openldap", "ui"]
    assert comps["cassandra"]["ports"] == [9042, 9160, 7000]
    assert comps["zookeeper"]["ports"] == [2181, 2888, 3888]
    assert comps["postgres"]["ports"] == [5432, 8084, 4530]
    assert comps["zookeeper"]["peer_ports"] == [2888, 3888]
    assert comps["cassandra"]["peer_ports"] == [7000]
    assert comps["zookeeper"]["targets"][2888] == "node_ip"
    assert comps["zookeeper"]["targets"][2181] == "loopback"
    assert comps["cassandra"]["targets"][7000] == "node_ip"
    for name in ("management-server", "ui"):
        assert comps[name]["ports"] == [] and comps[name]["range"] is None
    assert {c["short"] for c in comps.values()} == {
        "ms", "rt", "mp", "qpid", "pg", "zk", "cass", "ldap", "ui"}
    assert amp.EGRESS_RANGE == (10700, 10799)
    assert amp.CONSUL_PORTS == {8300, 8301, 8302, 8500, 8501, 8502, 8503, 8600}


def test_every_component_has_a_target_per_port():
    for spec in amp.COMPONENTS.values():
        assert set(spec["targets"]) == set(spec["ports"])
        assert set(spec["peer_ports"]) <= set(spec["ports"])


def test_default_ranges_are_disjoint_and_free_of_consul_ports():
    ranges = [c["range"] for c in amp.COMPONENTS.values() if c["range"]]
    ranges.append(amp.EGRESS_RANGE)
    for i, (alo, ahi) in enumerate(ranges):
        assert alo <= ahi
        assert not any(alo <= p <= ahi for p in amp.CONSUL_PORTS)
        for blo, bhi in ranges[:i]:
            assert ahi < blo or bhi < alo


def test_service_ports_cover_meshed_ports_and_protected_ssh():
    meshed = {p for c in amp.COMPONENTS.values() for p in c["ports"]}
    assert meshed <= amp.APIGEE_SERVICE_PORTS
    assert {22, 8080, 9000, 5432, 10389, 59001} <= amp.APIGEE_SERVICE_PORTS
    assert not amp.CONSUL_PORTS & amp.APIGEE_SERVICE_PORTS


def test_flow_table_is_over_known_components():
    for src, dsts in amp.FLOWS.items():
        assert src in amp.COMPONENTS
        assert set(dsts) <= set(amp.COMPONENTS)
    assert amp.FLOWS["ui"] == []
    assert "router" in amp.FLOWS["management-server"]


def test_names():
    assert amp.service_name("zookeeper", 2181, "10.77.0.11") == "zk-2181-10-77-0-11"
    assert amp.service_name("cassandra", 7000, "10.77.0.12") == "cass-7000-10-77-0-12"
    assert amp.service_name("openldap", 10389, "192.168.1.1") == "ldap-10389-192-168-1-1"
    assert amp.egress_name("10.77.0.11") == "egress-10-77-0-11"


# ---------------------------------------------------------------------------
# Errors and gossip keys
# ---------------------------------------------------------------------------

def test_pillar_error_shape():
    err = amp.PillarError("apigee_mtls:nodes:2:ip", "found x; expected y")
    assert isinstance(err, ValueError)
    assert err.key == "apigee_mtls:nodes:2:ip"
    assert err.message == "found x; expected y"
    assert str(err) == "apigee_mtls:nodes:2:ip: found x; expected y"
    copied = pickle.loads(pickle.dumps(err))
    assert (copied.key, copied.message) == (err.key, err.message)


def test_gossip_keygen_produces_valid_distinct_keys():
    first, second = amp.gossip_keygen(), amp.gossip_keygen()
    assert first != second
    assert len(base64.b64decode(first, validate=True)) == 32
    assert amp.check_gossip_key(first) is None


@pytest.mark.parametrize("size", [16, 24, 32])
def test_check_gossip_key_accepts_valid_sizes(size):
    assert amp.check_gossip_key(base64.b64encode(b"k" * size).decode()) is None


@pytest.mark.parametrize("key, fragment", [
    (None, "missing"),
    (42, "type integer"),
    ("%%%%", "not valid base64"),
    (base64.b64encode(b"x" * 31).decode(), "decodes to 31 bytes"),
    (GOSSIP + "\n", "not valid base64"),
])
def test_check_gossip_key_rejects(key, fragment):
    with pytest.raises(amp.PillarError) as info:
        amp.check_gossip_key(key)
    assert info.value.key == "apigee_mtls:secrets:gossip_key"
    assert fragment in info.value.message


def test_gossip_key_never_echoed_in_errors():
    secret = base64.b64encode(b"s" * 20).decode()
    with pytest.raises(amp.PillarError) as info:
        amp.check_gossip_key(secret)
    assert secret not in str(info.value)


# ---------------------------------------------------------------------------
# Bad pillar corpus
# ---------------------------------------------------------------------------

def _bad_pillar_files():
    return sorted(BAD_PILLARS.glob("*.yaml"))


def _expectations(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    heads = {}
    for line in lines[:2]:
        match = re.fullmatch(r"# (expect-key|expect): (.+)", line)
        assert match, "{}: bad header line {!r}".format(path.name, line)
        heads[match.group(1)] = match.group(2)
    return heads["expect-key"], heads["expect"]


def test_bad_pillar_corpus_is_large_enough():
    files = _bad_pillar_files()
    assert len(files) >= 30
    keys = {_expectations(f)[0] for f in files}
    assert len(keys) >= 30


@pytest.mark.parametrize("path", _bad_pillar_files(), ids=lambda p: p.stem)
def test_bad_pillar(path):
    key, fragment = _expectations(path)
    pillar = yaml.safe_load(path.read_text(encoding="utf-8"))
    with pytest.raises(amp.PillarError) as info:
        amp.validate(pillar)
    assert info.value.key == key, str(info.value)
    assert fragment in info.value.message, str(info.value)
    assert str(info.value) == "{}: {}".format(key, info.value.message)


def test_bad_pillar_errors_also_raised_by_plan():
    pillar = minimal()
    pillar["nodes"][1]["ip"] = "10.77.0.11"
    with pytest.raises(amp.PillarError) as info:
        amp.plan(pillar, "n1")
    assert info.value.key == "apigee_mtls:nodes:1:ip"


def test_minimal_pillar_is_valid():
    assert amp.validate(minimal())["servers"] == ["n1", "n2", "n3"]


# ---------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------

def test_defaults_are_filled():
    model = amp.normalize(minimal())
    assert model["datacenters"] == ["dc-1"]
    assert model["primary_datacenter"] == "dc-1"
    assert model["nodes"][1] == {
        "id": "n2", "ip": "10.77.0.12", "datacenter": "dc-1", "fqdn": None,
        "components": ["zookeeper"], "retired": False, "index": 1}
    assert model["cassandra_internode"] is True
    assert model["tls"] == {"signer": "n1", "ca_days_valid": 3650, "cert_days_valid": 365,
                            "cert_days_remaining": 30, "key_algo": "ec",
                            "ca_generation": 1, "ca_trust": []}
    consul = model["consul"]
    assert consul["version"] == "1.8.7"
    assert (consul["user"], consul["group"], consul["keep_user"]) == ("consul", "consul", False)
    assert consul["bin"] == "/usr/local/bin/consul"
    assert consul["config_dir"] == "/etc/consul.d"
    assert consul["data_dir"] == "/var/lib/consul"
    assert consul["tls_dir"] == "/etc/consul.d/tls"
    assert consul["log_level"] == "INFO"
    assert consul["dns_exposed"] is False
    assert consul["install"] == {"method": "pkg", "source": None, "source_hash": None,
                                 "name": "consul"}
    assert model["firewall"] == {"protected_ports": [22, 4505, 4506], "ipv6": True}
    assert model["proxy"] == {"user": "consul", "data_plane": "builtin", "envoy": None}
    assert model["secrets"] == {"gossip_key": GOSSIP, "connect_ca_key": None}
    assert model["acl"] == {"enabled": True, "down_policy": "extend-cache"}
    assert model["connect_ca"] == {"root_cert": None}
    assert model["port_ranges"]["zookeeper"] == [10001, 10099]
    assert model["port_ranges"]["egress"] == [10700, 10799]
    assert model["flows"]["router"] == ["qpid", "zookeeper", "cassandra"]


def test_validate_is_normalize():
    assert amp.validate(minimal()) == amp.normalize(minimal())


def test_null_sections_mean_defaults():
    pillar = minimal(tls=None, consul=None, firewall=None, proxy=None, flows=None,
                     components=None, port_ranges=None)
    assert amp.normalize(pillar) == amp.normalize(minimal())


def test_normalize_does_not_mutate_its_input(topo12):
    before = copy.deepcopy(topo12)
    model = amp.normalize(topo12)
    model["nodes"][0]["components"].append("ui")
    model["components"]["zookeeper"]["ports"].append(1)
    assert topo12 == before
    assert amp.COMPONENTS["zookeeper"]["ports"] == [2181, 2888, 3888]


def test_model_is_json_serializable(any_topology):
    model = amp.normalize(any_topology)
    assert json.loads(json.dumps(model))["nodes"][0]["id"] == "n1"


def test_signer_defaults_to_first_non_retired_zookeeper():
    pillar = minimal()
    pillar["nodes"].insert(0, {"id": "n0", "ip": "10.77.0.10", "components": ["router"]})
    pillar["nodes"].append({"id": "n4", "ip": "10.77.0.14", "components": ["zookeeper"]})
    pillar["nodes"][1]["retired"] = True
    assert amp.normalize(pillar)["tls"]["signer"] == "n2"
    pillar["tls"] = {"signer": "n0"}
    assert amp.normalize(pillar)["tls"]["signer"] == "n0"


def test_ip_is_canonicalized_and_node_options_kept():
    pillar = minimal()
    pillar["nodes"][0].update({"fqdn": "n1.lab", "datacenter": "dc-1"})
    node = amp.normalize(pillar)["nodes"][0]
    assert node["fqdn"] == "n1.lab"
    assert node["datacenter"] == "dc-1"


def test_consul_options_are_normalized():
    pillar = minimal(consul={
        "log_level": "debug", "user": "mesh", "group": "mesh", "keep_user": True,
        "data_dir": "/srv/consul/", "dns_exposed": True,
        "install": {"method": "archive", "source": "https://example.invalid/c.zip",
                    "source_hash": "sha512=" + "a" * 128}})
    model = amp.normalize(pillar)
    assert model["consul"]["log_level"] == "DEBUG"
    assert model["consul"]["data_dir"] == "/srv/consul"
    assert model["consul"]["install"] == {
        "method": "archive", "source": "https://example.invalid/c.zip",
        "source_hash": "sha512=" + "a" * 128, "name": None}
    assert model["proxy"]["user"] == "mesh"
    pillar["proxy"] = {"user": "mtls-proxy"}
    assert amp.normalize(pillar)["proxy"]["user"] == "mtls-proxy"


def test_pkg_install_name():
    model = amp.normalize(minimal(consul={"install": {"method": "pkg", "name": "consul-bin"}}))
    assert model["consul"]["install"]["name"] == "consul-bin"


def test_topology_fixture_install(any_topology):
    install = amp.normalize(any_topology)["consul"]["install"]
    assert install["method"] == "binary"
    assert install["source"] == "salt://consul/consul"
    assert install["source_hash"].startswith("sha256=a449efb1")


def test_cassandra_internode_off_drops_7000(topo5):
    topo5["cassandra_internode"] = False
    model = amp.normalize(topo5)
    assert model["components"]["cassandra"]["ports"] == [9042, 9160]
    # 7000's slot is kept: turning it off (or back on) moves no other port
    assert model["allocation"]["n2"]["ingress"]["cassandra"] == {9042: 10103, 9160: 10104}
    on = amp.normalize(dict(topo5, cassandra_internode=True))["allocation"]
    for node, alloc in model["allocation"].items():
        for comp, ports in alloc["ingress"].items():
            assert ports == {p: q for p, q in on[node]["ingress"][comp].items() if p != 7000}
    plan = amp.plan(topo5, "n1")
    assert all(u["component_port"] != 7000 for u in plan["upstreams"])
    assert not any(s["port"] == 7000 for s in plan["services"])


def test_component_override_target_and_ports(topo5):
    topo5["components"] = {"zookeeper": {"target": {2181: "node_ip"}},
                           "qpid": {"ports": [5672]}}
    model = amp.normalize(topo5)
    assert model["components"]["zookeeper"]["targets"][2181] == "node_ip"
    assert model["allocation"]["n5"]["ingress"]["qpid"] == {5672: 10401}
    services = {s["name"]: s for s in amp.plan(topo5, "n1")["services"]}
    assert services["zk-2181-10-77-0-11"]["address"] == "10.77.0.11"
    proxy = services["zk-2181-10-77-0-11"]["connect"]["sidecar_service"]["proxy"]
    assert proxy["local_service_address"] == "10.77.0.11"


def test_component_override_string_port_keys_accepted(topo5):
    topo5["components"] = {"zookeeper": {"target": {"2181": "node_ip"}}}
    assert amp.normalize(topo5)["components"]["zookeeper"]["targets"][2181] == "node_ip"


def test_flow_override_replaces_one_source_only(topo9):
    topo9["flows"] = {"router": ["qpid"]}
    model = amp.normalize(topo9)
    assert model["flows"]["router"] == ["qpid"]
    assert model["flows"]["message-processor"] == ["qpid", "zookeeper", "cassandra"]
    # n4 also runs a message processor, which still reaches zookeeper.
    comps = {u["component"] for u in amp.plan(topo9, "n4")["upstreams"]}
    assert comps == {"qpid", "zookeeper", "cassandra"}
    topo9["flows"] = {"router": ["qpid"], "message-processor": []}
    comps = {u["component"] for u in amp.plan(topo9, "n4")["upstreams"]}
    assert comps == {"qpid"}


def test_extra_protected_ports(topo5):
    topo5["firewall"] = {"protected_ports": [4506, 22, 4505, 2222]}
    model = amp.normalize(topo5)
    assert model["firewall"]["protected_ports"] == [22, 2222, 4505, 4506]
    rules = amp.plan(topo5, "n1")["firewall"]["filter"]
    assert IN + "-p tcp -m multiport --dports 22,2222,4505,4506 -j RETURN" in rules


# ---------------------------------------------------------------------------
# Port allocation
# ---------------------------------------------------------------------------

def test_allocation_is_linear_in_list_order(topo5):
    alloc = amp.normalize(topo5)["allocation"]
    assert alloc["n4"]["ingress"]["postgres"] == {5432: 10300, 8084: 10301, 4530: 10302}
    assert alloc["n5"]["ingress"]["postgres"] == {5432: 10303, 8084: 10304, 4530: 10305}
    assert alloc["n1"]["ingress"]["zookeeper"] == {2181: 10001, 2888: 10002, 3888: 10003}
    assert alloc["n3"]["ingress"]["zookeeper"] == {2181: 10007, 2888: 10008, 3888: 10009}
    assert alloc["n2"]["ingress"]["cassandra"] == {9042: 10103, 9160: 10104, 7000: 10105}
    assert alloc["n1"]["ingress"]["openldap"] == {10389: 10200}
    assert alloc["n4"]["ingress"]["qpid"] == {5672: 10400, 8083: 10401}
    assert alloc["n3"]["ingress"]["message-processor"] == {8082: 10502, 4528: 10503}
    assert alloc["n3"]["ingress"]["router"] == {8081: 10602, 4527: 10603}
    assert [alloc["n%d" % i]["egress"] for i in range(1, 6)] == list(range(10700, 10705))


def test_allocate_ports_matches_model_and_node_component_order(topo5):
    model = amp.normalize(topo5)
    assert amp.allocate_ports(model) == model["allocation"]
    assert list(model["allocation"]["n1"]["ingress"]) == ["cassandra", "openldap", "zookeeper"]
    assert model["allocation"]["n1"]["ingress"].keys().isdisjoint({"ui", "management-server"})


def test_allocation_unique_across_nodes_and_datacenters(any_topology):
    model = amp.normalize(any_topology)
    seen = {}
    for node_id, alloc in model["allocation"].items():
        ports = [alloc["egress"]] + [p for b in alloc["ingress"].values() for p in b.values()]
        for port in ports:
            assert port not in seen, (port, node_id, seen.get(port))
            seen[port] = node_id
        low, high = model["port_ranges"]["egress"]
        assert low <= alloc["egress"] <= high
        for comp, block in alloc["ingress"].items():
            low, high = model["port_ranges"][comp]
            assert all(low <= p <= high for p in block.values())
            assert list(block) == model["components"][comp]["ports"]
    forbidden = amp.APIGEE_SERVICE_PORTS | amp.CONSUL_PORTS | {4505, 4506}
    assert not set(seen) & forbidden


def test_two_dc_allocation_is_one_port_space(topo12):
    alloc = amp.normalize(topo12)["allocation"]
    assert alloc["n7"]["ingress"]["zookeeper"] == {2181: 10010, 2888: 10011, 3888: 10012}
    assert alloc["n12"]["ingress"]["postgres"] == {5432: 10303, 8084: 10304, 4530: 10305}
    assert alloc["n12"]["egress"] == 10711


@pytest.mark.parametrize("name", TOPOLOGY_NAMES)
def test_appending_a_node_moves_no_port(name):
    pillar = load_topology(name)
    before = amp.normalize(pillar)["allocation"]
    pillar["nodes"].append({
        "id": "new", "ip": "10.77.0.99", "datacenter": pillar["datacenters"][-1],
        "components": ["openldap", "zookeeper", "cassandra", "postgres", "qpid",
                       "router", "message-processor", "ui", "management-server"]})
    after = amp.normalize(pillar)["allocation"]
    assert set(after) == set(before) | {"new"}
    for node_id, alloc in before.items():
        assert after[node_id] == alloc
    assert after["new"]["ingress"]["zookeeper"][2181] > max(
        b["ingress"].get("zookeeper", {}).get(2181, 0) for b in before.values())


def test_retired_nodes_keep_their_slots(topo5):
    before = amp.normalize(topo5)["allocation"]
    node_by_id(topo5, "n4")["retired"] = True
    after = amp.normalize(topo5)["allocation"]
    assert after == before
    report = amp.port_report(topo5)
    assert report["n4"]["retired"] is True
    assert [e["proxy_port"] for e in report["n4"]["ingress"]] == [10300, 10301, 10302,
                                                                  10400, 10401]
    assert report["n4"]["upstreams"] == []


def test_retired_node_gets_nothing_and_is_reached_by_nobody(topo5):
    node_by_id(topo5, "n5")["retired"] = True
    plan = amp.plan(topo5, "n5")
    assert plan["node"]["retired"] is True
    assert plan["services"] == [] and plan["upstreams"] == [] and plan["proxies"] == []
    assert plan["firewall"] == {"nat": [], "filter": [], "member_ports": [], "members": [],
                                "ip6": {"input": [], "output": []}}
    assert plan["consul_config"] is None and plan["certificate"] is None
    for node_id in ("n1", "n2", "n3", "n4"):
        other = amp.plan(topo5, node_id)
        assert all(u["node"] != "n5" for u in other["upstreams"])
        assert not any("10.77.0.15" in r for r in other["firewall"]["filter"])
        assert "10.77.0.15" not in other["firewall"]["members"]
    assert not any(i["source"] == "egress-10-77-0-15" for i in amp.intentions(topo5))


def test_exhaustion_error(topo5):
    topo5["port_ranges"] = {"postgres": [10300, 10304]}
    with pytest.raises(amp.PillarError) as info:
        amp.normalize(topo5)
    assert info.value.key == "apigee_mtls:port_ranges:postgres"
    assert info.value.message.startswith(
        "needs 6 ports for 2 nodes, range 10300-10304 holds 5")


@pytest.mark.parametrize("bounds,ok", [
    ((32700, 32767), True), ((61000, 61099), True), ((32700, 32768), False),
    ((60999, 61099), False), ((20000, 65000), False)])
def test_proxy_ranges_stay_out_of_the_default_ephemeral_ports(topo5, bounds, ok):
    """Issue 16: APIGEE-MTLS-IN refuses non-members on the proxy ports before its
    ESTABLISHED RETURN; a proxy port the kernel may pick as a source port (default
    net.ipv4.ip_local_port_range 32768-60999) would get replies to this node's own outgoing
    connections refused."""
    topo5["port_ranges"] = {"router": list(bounds)}
    if ok:
        assert amp.normalize(topo5)["port_ranges"]["router"] == list(bounds)
        return
    with pytest.raises(amp.PillarError) as info:
        amp.normalize(topo5)
    assert info.value.key == "apigee_mtls:port_ranges:router"
    assert "expected a range below 32768 or above 60999" in info.value.message


def test_range_that_exactly_fits(topo5):
    topo5["port_ranges"] = {"postgres": [10300, 10305], "egress": [10700, 10704]}
    assert amp.normalize(topo5)["allocation"]["n5"]["egress"] == 10704
    topo5["nodes"].append({"id": "n6", "ip": "10.77.0.16", "components": ["ui"]})
    with pytest.raises(amp.PillarError) as info:
        amp.normalize(topo5)
    assert info.value.key == "apigee_mtls:port_ranges:egress"
    assert "needs 6 ports for 6 nodes" in info.value.message


def test_clash_with_apigee_service_port(topo5):
    topo5["port_ranges"] = {"router": [8998, 9097]}
    with pytest.raises(amp.PillarError) as info:
        amp.normalize(topo5)
    assert info.value.key == "apigee_mtls:port_ranges:router"
    assert "allocated port 8998 (router 8081 on node n2)" in info.value.message
    assert "Apigee service port 8998" in info.value.message


def test_clash_is_checked_on_allocated_ports_only(topo5):
    # 9003-9006 are free; the range also holds 9042, which is never reached.
    topo5["port_ranges"] = {"router": [9003, 9050]}
    alloc = amp.normalize(topo5)["allocation"]
    assert alloc["n3"]["ingress"]["router"] == {8081: 9005, 4527: 9006}


def test_clash_reports_the_node_that_would_get_it(topo5):
    topo5["port_ranges"] = {"message-processor": [9996, 10000], "router": [8994, 8997]}
    model = amp.normalize(topo5)
    assert model["allocation"]["n3"]["ingress"]["router"] == {8081: 8996, 4527: 8997}
    topo5["port_ranges"]["router"] = [8995, 8998]
    with pytest.raises(amp.PillarError) as info:
        amp.normalize(topo5)
    assert "allocated port 8998 (router 4527 on node n3)" in info.value.message


def test_custom_ranges(topo5):
    topo5["port_ranges"] = {"zookeeper": [20001, 20099], "egress": [30000, 30004]}
    alloc = amp.normalize(topo5)["allocation"]
    assert alloc["n2"]["ingress"]["zookeeper"] == {2181: 20004, 2888: 20005, 3888: 20006}
    assert alloc["n5"]["egress"] == 30004
    assert alloc["n1"]["ingress"]["cassandra"][9042] == 10100
    plan = amp.plan(topo5, "n4")
    assert any(u["proxy_port"] == 20001 and u["component_port"] == 2181
               for u in plan["upstreams"])


def test_override_adding_ports_to_portless_component(topo13):
    topo13["components"] = {"ui": {"ports": [9000]}}
    topo13["port_ranges"] = {"ui": [11000, 11009]}
    topo13["flows"] = {"management-server": amp.FLOWS["management-server"] + ["ui"]}
    model = amp.normalize(topo13)
    assert model["allocation"]["n6"]["ingress"]["ui"] == {9000: 11000}
    assert model["allocation"]["n7"]["ingress"]["ui"] == {9000: 11001}
    assert ("ui", 9000) in amp.flows_between(model, "n6", "n7")


# ---------------------------------------------------------------------------
# Flows
# ---------------------------------------------------------------------------

def test_management_server_reaches_routers(topo5):
    model = amp.normalize(topo5)
    for dst in ("n2", "n3"):
        flows = amp.flows_between(model, "n1", dst)
        assert ("router", 8081) in flows and ("router", 4527) in flows
        assert ("message-processor", 8082) in flows
        # n1 runs zookeeper and cassandra itself: peer ports are reached too.
        assert ("zookeeper", 2888) in flows and ("cassandra", 7000) in flows


def test_postgres_qpid_node_flows(topo5):
    model = amp.normalize(topo5)
    assert amp.flows_between(model, "n4", "n5") == [
        ("postgres", 5432), ("postgres", 8084), ("postgres", 4530)]
    assert amp.flows_between(model, "n4", "n1") == [
        ("cassandra", 9042), ("cassandra", 9160), ("zookeeper", 2181)]
    plan = amp.plan(topo5, "n4")
    pairs = {(u["node"], u["component_port"]) for u in plan["upstreams"]}
    assert ("n5", 5432) in pairs and ("n1", 2181) in pairs
    assert not {p for _, p in pairs} & {2888, 3888, 7000, 5672, 8083}


def test_router_only_node_never_reaches_openldap(topo9, topo13):
    for pillar, node_id in ((topo9, "n4"), (topo13, "n10")):
        plan = amp.plan(pillar, node_id)
        assert plan["upstreams"]
        assert {u["component"] for u in plan["upstreams"]} == {"qpid", "zookeeper",
                                                               "cassandra"}
        assert not any(u["component_port"] in (2888, 3888, 7000) for u in plan["upstreams"])


def test_ui_only_node_reaches_nothing():
    pillar = minimal()
    pillar["nodes"].append({"id": "web", "ip": "10.77.0.20", "components": ["ui"]})
    plan = amp.plan(pillar, "web")
    assert plan["upstreams"] == []
    assert [s["id"] for s in plan["services"]] == ["egress-ui-10-77-0-20"]
    assert plan["firewall"]["nat"] == [OUT + "-m owner --uid-owner consul -j RETURN"]


def test_flows_never_to_self_and_never_retired(topo5):
    model = amp.normalize(topo5)
    assert amp.flows_between(model, "n1", "n1") == []
    for plan in all_plans(topo5).values():
        assert all(u["node"] != plan["node"]["id"] for u in plan["upstreams"])
    assert amp.flows_between(model, "n4", "n5") != []
    node_by_id(topo5, "n5")["retired"] = True
    model = amp.normalize(topo5)
    assert amp.flows_between(model, "n4", "n5") == []
    assert amp.flows_between(model, "n5", "n4") == []


def test_flows_between_unknown_node(topo5):
    with pytest.raises(amp.PillarError) as info:
        amp.flows_between(amp.normalize(topo5), "n1", "nope")
    assert info.value.key == "apigee_mtls:nodes"


def test_our_flow_additions(topo13):
    model = amp.normalize(topo13)
    # OpenLDAP replication between n4 and n5; qpid-server writes to Postgres.
    assert amp.flows_between(model, "n4", "n5") == [("openldap", 10389)]
    assert ("postgres", 5432) in amp.flows_between(model, "n12", "n8")


def test_zookeeper_cassandra_peers_reach_each_other(topo13):
    model = amp.normalize(topo13)
    assert amp.flows_between(model, "n1", "n2") == [
        ("cassandra", 9042), ("cassandra", 9160), ("cassandra", 7000),
        ("zookeeper", 2181), ("zookeeper", 2888), ("zookeeper", 3888)]


def test_upstreams_match_flows_between(any_topology):
    model = amp.normalize(any_topology)
    for node in model["nodes"]:
        ups = amp.plan(any_topology, node["id"])["upstreams"]
        expected = [(other["id"], comp, port)
                    for other in model["nodes"]
                    for comp, port in amp.flows_between(model, node["id"], other["id"])]
        assert sorted((u["node"], u["component"], u["component_port"]) for u in ups) \
            == sorted(expected)
        for up in ups:
            alloc = model["allocation"][up["node"]]["ingress"][up["component"]]
            assert up["proxy_port"] == alloc[up["component_port"]]
            assert up["service"] == amp.service_name(up["component"],
                                                     up["component_port"], up["ip"])


def test_upstreams_are_sorted_by_node_then_port(topo5):
    ups = amp.plan(topo5, "n1")["upstreams"]
    index = {"n%d" % i: i for i in range(1, 6)}
    keys = [(index[u["node"]], u["proxy_port"]) for u in ups]
    assert keys == sorted(keys)
    assert ups[0]["node"] == "n2"


# ---------------------------------------------------------------------------
# Intentions
# ---------------------------------------------------------------------------

def test_intentions_default_deny_then_exact_allows(any_topology):
    result = amp.intentions(any_topology)
    assert result[0] == {"source": "*", "destination": "*", "action": "deny"}
    allows = result[1:]
    assert all(i["action"] == "allow" for i in allows)
    pairs = [(i["source"], i["destination"]) for i in allows]
    assert len(pairs) == len(set(pairs))
    expected = set()
    for plan in all_plans(any_topology).values():
        src = plan["egress"]["identity"] if plan["egress"] else None
        expected |= {(src, u["service"]) for u in plan["upstreams"]}
    assert set(pairs) == expected
    # one source per role: a component set
    roles = {amp.egress_identity(n["components"]) for n in any_topology["nodes"]
             if not n.get("retired")}
    assert {i["source"] for i in allows} <= roles


def test_intentions_are_each_role_s_upstreams_in_upstream_order(any_topology):
    """A role's allows are the union of its nodes' upstreams, sorted as upstreams are (node
    order, then proxy port); roles sorted."""
    by_role = {}
    for node in any_topology["nodes"]:
        plan = amp.plan(any_topology, node["id"])
        if plan["egress"]:
            order = {n["id"]: i for i, n in enumerate(any_topology["nodes"])}
            by_role.setdefault(plan["egress"]["identity"], set()).update(
                (order[u["node"]], u["proxy_port"], u["service"]) for u in plan["upstreams"])
    expected = [(role, dest) for role in sorted(by_role)
                for _, _, dest in sorted(by_role[role])]
    got = [(i["source"], i["destination"]) for i in amp.intentions(any_topology)[1:]]
    assert got == expected


def test_intentions_destinations_are_registered_services(topo12):
    services = set()
    egress = set()
    for plan in all_plans(topo12).values():
        for svc in plan["services"]:
            if svc["meta"]["apigee_mtls"] == "ingress":
                services.add(svc["name"])
            else:
                egress.add(svc["name"])
    for item in amp.intentions(topo12)[1:]:
        assert item["destination"] in services
        assert item["source"] in egress


def test_intentions_are_deterministic(topo13):
    assert amp.intentions(topo13) == amp.intentions(load_topology("13-node"))


def test_intention_sample(topo5):
    allows = amp.intentions(topo5)
    # n4 and n5 are both qpid + postgres: one identity, each reaching the other's Postgres
    assert {"source": "egress-qpid-pg", "destination": "pg-5432-10-77-0-15",
            "action": "allow"} in allows
    assert {"source": "egress-qpid-pg", "destination": "pg-5432-10-77-0-14",
            "action": "allow"} in allows
    assert {"source": "egress-qpid-pg", "destination": "zk-2888-10-77-0-11",
            "action": "allow"} not in allows


# ---------------------------------------------------------------------------
# Firewall
# ---------------------------------------------------------------------------

_RULE_RE = re.compile(
    r"-A APIGEE-MTLS-(?:IN|OUT)"
    r"(?: -s \d+\.\d+\.\d+\.\d+/32)?(?: -d \d+\.\d+\.\d+\.\d+/32)?(?: -i lo)?"
    r"(?: -p (?:tcp|udp))?"
    r"(?: -m owner --uid-owner \w+| -m conntrack --ctstate RELATED,ESTABLISHED"
    r"| -m (?:tcp|udp) --dport \d+(?: --tcp-flags FIN,SYN,RST,ACK SYN)?"
    r"| -m multiport --[ds]ports [\d,:]+)?"
    r" -j (?:RETURN|DROP|REJECT --reject-with tcp-reset"
    r"|DNAT --to-destination 127\.\d+\.\d+\.\d+:\d+)")


def test_rules_use_the_canonical_iptables_s_form(any_topology):
    for plan in all_plans(any_topology).values():
        for rule in plan["firewall"]["nat"] + plan["firewall"]["filter"]:
            assert _RULE_RE.fullmatch(rule), rule


def test_nat_chain(topo5):
    plan = amp.plan(topo5, "n4")
    nat = plan["firewall"]["nat"]
    assert nat[0] == OUT + "-m owner --uid-owner consul -j RETURN"
    assert len(nat) == 1 + len(plan["upstreams"])
    bind = amp.egress_bind_address("egress-qpid-pg")
    assert plan["egress"]["bind_address"] == bind
    # a connection's first packet only: one opened before conntrack tracked it keeps its path
    assert OUT + ("-d 10.77.0.15/32 -p tcp -m tcp --dport 5432 --tcp-flags FIN,SYN,RST,ACK SYN"
                  f" -j DNAT --to-destination {bind}:10303") in nat
    assert OUT + ("-d 10.77.0.11/32 -p tcp -m tcp --dport 2181 --tcp-flags FIN,SYN,RST,ACK SYN"
                  f" -j DNAT --to-destination {bind}:10001") in nat
    assert not any("--dport 2888" in r for r in nat)


def test_nat_chain_with_uid(topo5):
    topo5["proxy"] = {"user": "mtls"}
    assert amp.plan(topo5, "n1")["firewall"]["nat"][0] == \
        OUT + "-m owner --uid-owner mtls -j RETURN"
    assert amp.plan(topo5, "n1", proxy_uid=998)["firewall"]["nat"][0] == \
        OUT + "-m owner --uid-owner 998 -j RETURN"


def test_filter_chain_snapshot(topo5):
    rules = amp.plan(topo5, "n4")["firewall"]["filter"]
    assert rules[:2] == [
        IN + "-i lo -j RETURN",
        IN + "-p tcp -m multiport --dports 22,4505,4506 -j RETURN",
    ]
    member = ("-p tcp -m multiport --dports "
              "8300:8302,8501:8503,8600,10300:10302,10400,10401,10703 -j RETURN")
    assert rules[2:22] == [
        IN + rule.format(ip="10.77.0.1%d" % i)
        for i in range(1, 6)
        for rule in ("-s {ip}/32 " + member,
                     "-s {ip}/32 -p udp -m multiport --dports 8301,8302,8600 -j RETURN",
                     "-s {ip}/32 -p tcp -m multiport --sports 8300:8302 -j RETURN",
                     "-s {ip}/32 -p udp -m multiport --sports 8301,8302 -j RETURN")]
    # replies from anyone else's Consul RPC and gossip ports are refused: a node removed from
    # the pillar fails in gossip even though this node's own probes and syncs reach it
    assert rules[22:24] == [
        IN + "-p tcp -m multiport --sports 8300:8302 -j REJECT --reject-with tcp-reset",
        IN + "-p udp -m multiport --sports 8301,8302 -j DROP"]
    # Consul's and n4's sidecar ports refuse everyone else before the ESTABLISHED RETURN:
    # a node removed from the pillar loses the connections it had open (issue 16)
    assert rules[24:27] == [
        IN + ("-p tcp -m multiport --dports 8300:8302,8500:8503,8600,10300:10302,10400,"
              "10401,10703 -j REJECT --reject-with tcp-reset"),
        IN + "-p udp -m multiport --dports 8301,8302,8600 -j DROP",
        IN + "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
    ]
    # the component lockdown refuses new connections only: after the ESTABLISHED RETURN, and
    # a SYN only (an untracked connection opened before the mesh is not cut either)
    assert rules[27:] == [IN + "-p tcp -m tcp --dport %d --tcp-flags FIN,SYN,RST,ACK SYN -j "
                          "REJECT --reject-with tcp-reset" % p
                          for p in (4530, 5432, 5672, 8083, 8084)]


def _dports(rule):
    match = re.search(r"--dports? (\S+)", rule)
    return expand(match.group(1)) if match else set()


def _sports(rule):
    match = re.search(r"--sports (\S+)", rule)
    return expand(match.group(1)) if match else set()


def test_only_member_sources_pass_consul_and_sidecar_ports_before_established(any_topology):
    """Issue 16: every packet to Consul's or the node's sidecar ports, established or not,
    meets the member RETURNs and then a refusal before the ESTABLISHED RETURN; replies to the
    node's own outgoing connections, addressed to an ephemeral port, never match them."""
    established = IN + "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"
    for plan in all_plans(any_topology).values():
        if plan["node"]["retired"]:
            continue
        rules = plan["firewall"]["filter"]
        cut = rules.index(established)
        policed = set(plan["firewall"]["member_ports"])
        before = rules[:cut]
        refused_tcp = set().union(*(_dports(r) for r in before
                                    if "-p tcp" in r and "REJECT" in r))
        assert refused_tcp == policed
        assert {p for r in before if "-p udp" in r and "DROP" in r for p in _dports(r)} == \
            set(amp.CONSUL_MEMBER_UDP_PORTS)
        # the members' RETURNs for these ports come before any refusal
        first_refusal = min(i for i, r in enumerate(rules) if "REJECT" in r or "DROP" in r)
        members = [i for i, r in enumerate(rules) if " -s " in r]
        assert members and max(members) < first_refusal < cut
        assert all(p < amp.EPHEMERAL_PORTS[0] or p > amp.EPHEMERAL_PORTS[1] for p in policed)


def test_protected_ports_are_never_refused(any_topology):
    """The protected ports are RETURNed right after loopback, before anything refuses, and no
    refusal names one of them (validation keeps them out of Consul's ports and the proxy
    ranges)."""
    any_topology["firewall"] = {"protected_ports": [22, 2222, 4505, 4506]}
    protected = {22, 2222, 4505, 4506}
    for plan in all_plans(any_topology).values():
        rules = plan["firewall"]["filter"]
        if not rules:  # a retired node
            continue
        assert rules[1] == IN + "-p tcp -m multiport --dports 22,2222,4505,4506 -j RETURN"
        for rule in rules[2:]:
            if "REJECT" in rule or "DROP" in rule:
                ports = _dports(rule) or _sports(rule)
                assert ports and not ports & protected, rule


def test_redirect_stage_differs_from_full_only_by_the_component_lockdown(any_topology):
    """lockdown=False (a staged rollout's redirect stage): the same nat redirects and member
    rules, minus exactly the REJECTs of meshed component ports."""
    for node in [n["id"] for n in any_topology["nodes"]][:5]:
        full = amp.plan(any_topology, node)
        staged = amp.plan(any_topology, node, lockdown=False)
        assert staged["firewall"]["nat"] == full["firewall"]["nat"]
        meshed = {p for block in full["ports"]["ingress"].values() for p in block}
        dropped = [r for r in full["firewall"]["filter"] if r not in staged["firewall"]["filter"]]
        assert dropped == [IN + "-p tcp -m tcp --dport %d --tcp-flags FIN,SYN,RST,ACK SYN -j "
                           "REJECT --reject-with tcp-reset" % p for p in sorted(meshed)]
        assert [r for r in full["firewall"]["filter"] if r not in dropped] == \
            staged["firewall"]["filter"]
        assert {k: v for k, v in staged.items() if k != "firewall"} == \
            {k: v for k, v in full.items() if k != "firewall"}


def test_protected_ports_come_before_everything_restrictive(any_topology):
    for plan in all_plans(any_topology).values():
        rules = plan["firewall"]["filter"]
        protected = [i for i, r in enumerate(rules) if " -s " not in r
                     and "--dports 22," in r and r.endswith("RETURN")]
        assert protected == [1]
        first_other = min(i for i, r in enumerate(rules) if " -s " in r or "REJECT" in r
                          or "DROP" in r)
        assert protected[0] < first_other


def test_members_include_self_and_other_dc_but_not_retired(topo12):
    node_by_id(topo12, "n11")["retired"] = True
    rules = amp.plan(topo12, "n1")["firewall"]["filter"]
    sources = {m.group(1) for m in (re.search(r"-s ([\d.]+)/32", r) for r in rules) if m}
    expected = {"10.77.0.%d" % (10 + i) for i in range(1, 13)} - {"10.77.0.21"}
    assert sources == expected


def test_multiport_lists_hold_at_most_15_slots(amp):
    ports = list(range(20000, 20060, 2)) + [30000, 30001, 30002, 30003, 30005]
    chunks = amp._multiport_chunks(ports)
    assert len(chunks) > 1
    assert all(multiport_cost(c) <= 15 for c in chunks)
    assert set().union(*(expand(c) for c in chunks)) == set(ports)
    assert "30000:30003" in chunks[-1]
    assert amp._multiport_chunks([8301, 8302]) == ["8301,8302"]
    assert amp._multiport_chunks([1, 2, 3]) == ["1:3"]
    assert amp._multiport_chunks(list(range(1, 30, 2))) == [",".join(
        str(p) for p in range(1, 30, 2))]
    assert len(amp._multiport_chunks(list(range(1, 32, 2)))) == 2


def test_many_ports_are_chunked_in_rules(topo5):
    topo5["firewall"] = {"protected_ports": [22] + list(range(2000, 2040, 2))}
    topo5["nodes"].append({
        "id": "big", "ip": "10.77.0.50",
        "components": ["openldap", "zookeeper", "cassandra", "postgres", "qpid", "router",
                       "message-processor"]})
    for node_id in ("n1", "big"):
        rules = amp.plan(topo5, node_id)["firewall"]["filter"]
        protected = [r for r in rules if r.endswith("RETURN") and " -s " not in r
                     and "--dports" in r]
        assert len(protected) == 2
        assert set().union(*(expand(r.split("--dports ")[1].split()[0])
                             for r in protected)) == {22} | set(range(2000, 2040, 2))
        for rule in rules:
            if "--dports" in rule:
                assert multiport_cost(rule.split("--dports ")[1].split()[0]) <= 15
    rules = amp.plan(topo5, "big")["firewall"]["filter"]
    allowed = set()
    for rule in rules:
        if rule.startswith(IN + "-s 10.77.0.11/32 -p tcp") and "--dports" in rule:
            allowed |= expand(rule.split("--dports ")[1].split()[0])
    alloc = amp.normalize(topo5)["allocation"]["big"]
    sidecar = {alloc["egress"]} | {p for b in alloc["ingress"].values() for p in b.values()}
    assert allowed == set(amp.CONSUL_MEMBER_TCP_PORTS) | sidecar


def test_render_iptables_restore(amp):
    payload = amp.render_iptables_restore({"nat": [OUT + "-j RETURN"],
                                           "filter": [IN + "-i lo -j RETURN"]})
    assert payload == ("*nat\n:APIGEE-MTLS-OUT - [0:0]\n-A APIGEE-MTLS-OUT -j RETURN\n"
                       "COMMIT\n*filter\n:APIGEE-MTLS-IN - [0:0]\n"
                       "-A APIGEE-MTLS-IN -i lo -j RETURN\nCOMMIT\n")
    empty = amp.render_iptables_restore({"nat": [], "filter": []})
    assert empty == ("*nat\n:APIGEE-MTLS-OUT - [0:0]\nCOMMIT\n"
                     "*filter\n:APIGEE-MTLS-IN - [0:0]\nCOMMIT\n")


def test_render_full_plan(topo5):
    firewall = amp.plan(topo5, "n1")["firewall"]
    lines = amp.render_iptables_restore(firewall).splitlines()
    assert lines.count("COMMIT") == 2
    assert lines[:3] == ["*nat", ":APIGEE-MTLS-OUT - [0:0]", firewall["nat"][0]]
    nat_end = lines.index("COMMIT")
    assert lines[nat_end + 1: nat_end + 3] == ["*filter", ":APIGEE-MTLS-IN - [0:0]"]
    assert lines[nat_end + 3:-1] == firewall["filter"]


# ---------------------------------------------------------------------------
# Consul configuration
# ---------------------------------------------------------------------------

def test_consul_config_server_and_client(topo5):
    server = amp.plan(topo5, "n2")
    client = amp.plan(topo5, "n4")
    assert server["is_server"] and not client["is_server"]
    assert server["servers"] == ["n1", "n2", "n3"]
    s, c = server["consul_config"], client["consul_config"]
    assert s["server"] is True and s["bootstrap_expect"] == 3
    assert c["server"] is False and "bootstrap_expect" not in c
    assert s["retry_join"] == ["10.77.0.11", "10.77.0.13"]
    assert c["retry_join"] == ["10.77.0.11", "10.77.0.12", "10.77.0.13"]
    assert "retry_join_wan" not in s and "retry_join_wan" not in c
    assert s["retry_interval"] == c["retry_interval"] == "5s"
    assert s["node_name"] == "n2"
    assert s["bind_addr"] == s["advertise_addr"] == s["advertise_addr_wan"] == "10.77.0.12"
    assert s["addresses"] == {"http": "127.0.0.1", "https": "10.77.0.12",
                              "dns": "127.0.0.1"}
    assert s["ports"] == {"http": 8500, "https": 8501, "grpc": -1, "dns": 8600}
    assert s["client_addr"] == "127.0.0.1"
    assert (s["ca_file"], s["cert_file"], s["key_file"]) == (
        "/etc/consul.d/tls/ca.pem", "/etc/consul.d/tls/agent.pem",
        "/etc/consul.d/tls/agent-key.pem")
    for flag, value in (("verify_incoming", True), ("verify_outgoing", True),
                        ("verify_server_hostname", True), ("disable_update_check", True),
                        ("enable_script_checks", False), ("disable_remote_exec", True),
                        ("leave_on_terminate", False), ("skip_leave_on_interrupt", True),
                        ("ui", False)):
        assert s[flag] is value and c[flag] is value
    assert s["connect"] == {"enabled": True}
    assert s["datacenter"] == s["primary_datacenter"] == "dc-1"


def test_gossip_key_only_in_encrypt_config(any_topology):
    for plan in all_plans(any_topology).values():
        assert GOSSIP not in json.dumps(plan["consul_config"])
        assert "encrypt" not in plan["consul_config"]
        assert plan["encrypt_config"] == {"encrypt": GOSSIP, "encrypt_verify_incoming": True,
                                          "encrypt_verify_outgoing": True}


def test_consul_config_two_datacenters(topo12):
    plans = all_plans(topo12)
    n8 = plans["n8"]["consul_config"]
    assert n8["datacenter"] == "dc-2" and n8["primary_datacenter"] == "dc-1"
    assert n8["bootstrap_expect"] == 3
    assert n8["retry_join"] == ["10.77.0.17", "10.77.0.19"]
    assert n8["retry_join_wan"] == ["10.77.0.11", "10.77.0.12", "10.77.0.13"]
    n1 = plans["n1"]["consul_config"]
    assert n1["retry_join_wan"] == ["10.77.0.17", "10.77.0.18", "10.77.0.19"]
    n10 = plans["n10"]["consul_config"]
    assert "retry_join_wan" not in n10 and "bootstrap_expect" not in n10
    assert n10["retry_join"] == ["10.77.0.17", "10.77.0.18", "10.77.0.19"]
    assert plans["n10"]["primary_datacenter"] == "dc-1"
    assert plans["n10"]["datacenter"] == "dc-2"


def test_bootstrap_expect_counts_servers_in_own_dc():
    pillar = load_topology("12-node-2dc")
    node_by_id(pillar, "n1")["components"].remove("zookeeper")
    pillar["nodes"].append({"id": "z", "ip": "10.77.0.40", "datacenter": "dc-2",
                            "components": ["zookeeper"]})
    # 2 ZooKeeper nodes in dc-1 give 1 server, 4 in dc-2 give 3: an odd number per DC
    assert amp.plan(pillar, "n2")["consul_config"]["bootstrap_expect"] == 1
    assert amp.plan(pillar, "n3")["consul_config"]["server"] is False
    assert amp.plan(pillar, "n8")["consul_config"]["bootstrap_expect"] == 3
    assert amp.plan(pillar, "z")["consul_config"]["server"] is False
    assert amp.plan(pillar, "n1")["consul_config"]["server"] is False


def test_dns_exposed(topo5):
    topo5["consul"]["dns_exposed"] = True
    assert amp.plan(topo5, "n1")["consul_config"]["addresses"]["dns"] == "0.0.0.0"


# ---------------------------------------------------------------------------
# Services
# ---------------------------------------------------------------------------

def test_ingress_services(topo5):
    plan = amp.plan(topo5, "n1")
    services = {s["id"]: s for s in plan["services"]}
    assert set(services) == {
        "cass-9042-10-77-0-11", "cass-9160-10-77-0-11", "cass-7000-10-77-0-11",
        "ldap-10389-10-77-0-11", "zk-2181-10-77-0-11", "zk-2888-10-77-0-11",
        "zk-3888-10-77-0-11", "egress-ms-zk-cass-ldap-ui-10-77-0-11"}
    zk = services["zk-2888-10-77-0-11"]
    assert zk == {
        "id": "zk-2888-10-77-0-11", "name": "zk-2888-10-77-0-11",
        "address": "10.77.0.11", "port": 2888,
        "meta": {"apigee_mtls": "ingress", "component": "zookeeper",
                 "component_port": "2888", "node": "n1"},
        "connect": {"sidecar_service": {
            "address": "10.77.0.11", "port": 10002,
            "checks": [
                {"name": "Connect Sidecar Listening", "tcp": "10.77.0.11:10002",
                 "interval": "5s", "status": "passing"},
                {"name": "Connect Sidecar Aliasing zk-2888-10-77-0-11",
                 "alias_service": "zk-2888-10-77-0-11", "status": "passing"}],
            "proxy": {"local_service_address": "10.77.0.11", "local_service_port": 2888}}},
    }
    # the listening check dials the public listener (node IP), not local_service_address
    ldap_check = services["ldap-10389-10-77-0-11"]["connect"]["sidecar_service"]["checks"][0]
    assert ldap_check["tcp"] == "10.77.0.11:10200"
    ldap = services["ldap-10389-10-77-0-11"]
    # registered on the node IP (the sidecar health check dials it), plaintext to loopback
    assert ldap["address"] == "10.77.0.11"
    assert ldap["connect"]["sidecar_service"]["proxy"] == {
        "local_service_address": "127.0.0.1", "local_service_port": 10389}
    assert ldap["connect"]["sidecar_service"]["port"] == 10200
    assert services["cass-7000-10-77-0-11"]["address"] == "10.77.0.11"
    for svc in plan["services"]:
        assert all(isinstance(v, str) for v in svc["meta"].values())


def test_egress_service(topo12):
    plan = amp.plan(topo12, "n10")
    egress = plan["services"][-1]
    role = amp.egress_identity(amp.plan(topo12, "n10")["node"]["components"])
    assert egress["name"] == role and role.startswith("egress-")
    assert egress["id"] == role + "-10-77-0-20"
    assert egress["port"] == 10709
    bind = amp.egress_bind_address(role)
    assert egress["meta"] == {"apigee_mtls": "egress", "node": "n10", "bind_address": bind}
    assert plan["egress"] == {
        "id": egress["id"], "identity": role, "unit": "apigee-mtls-proxy@" + egress["id"],
        "bind_address": bind,
        "services_file": "/etc/consul.d/apigee-mtls-services.json",
        "draining_file": "/etc/consul.d/apigee-mtls-draining.json"}
    sidecar = egress["connect"]["sidecar_service"]
    assert sidecar["port"] == 10709
    # Consul's alias check names the instance (its ID), not the identity
    assert sidecar["checks"] == [{"name": f"Connect Sidecar Aliasing {egress['id']}",
                                  "alias_service": egress["id"], "status": "passing"}]
    proxy = sidecar["proxy"]
    assert proxy["local_service_address"] == "127.0.0.1"
    assert proxy["local_service_port"] == 10709
    ups = plan["upstreams"]
    assert len(proxy["upstreams"]) == len(ups) > 0
    for binding, up in zip(proxy["upstreams"], ups):
        assert binding["destination_name"] == up["service"]
        assert binding["local_bind_address"] == bind == up["local_bind_address"]
        assert binding["local_bind_port"] == up["proxy_port"]
        if up["datacenter"] == "dc-2":
            assert "datacenter" not in binding
        else:
            assert binding["datacenter"] == "dc-1"
    assert {b.get("datacenter") for b in proxy["upstreams"]} == {None, "dc-1"}


def test_services_sorted_and_proxies(any_topology):
    for plan in all_plans(any_topology).values():
        ingress = plan["services"][:-1]
        ports = [s["connect"]["sidecar_service"]["port"] for s in ingress]
        assert ports == sorted(ports)
        assert plan["services"][-1]["meta"]["apigee_mtls"] == "egress"
        assert plan["proxies"] == [s["id"] for s in plan["services"]]
        assert len(set(plan["proxies"])) == len(plan["proxies"])


def test_component_order_on_a_node_does_not_change_its_plan(topo5):
    before = amp.plan(topo5, "n1")
    node_by_id(topo5, "n1")["components"].reverse()
    after = amp.plan(topo5, "n1")
    assert after["services"] == before["services"]
    assert after["upstreams"] == before["upstreams"]
    assert after["firewall"] == before["firewall"]


def test_plan_unknown_node(topo5):
    with pytest.raises(amp.PillarError) as info:
        amp.plan(topo5, "n99")
    assert info.value.key == "apigee_mtls:nodes"
    assert "'n99'" in info.value.message


def test_plan_keys(topo5):
    plan = amp.plan(topo5, "n1")
    assert {"node", "servers", "is_server", "datacenter", "primary_datacenter",
            "consul_config", "encrypt_config", "services", "upstreams", "proxies",
            "firewall", "certificate", "signer", "signing_policy"} <= set(plan)
    assert plan["signer"] == "n1"
    assert plan["signing_policy"] == "apigee_mtls_n1"
    assert plan["node"]["id"] == "n1"


# ---------------------------------------------------------------------------
# Certificates and signing policies
# ---------------------------------------------------------------------------

def test_ca_generations_default_to_the_first_ca(topo5):
    plan = amp.plan(topo5, "n4")
    assert (plan["tls"]["ca_generation"], plan["tls"]["ca_trust"]) == (1, [])
    # generation 1 is the CA every existing cluster has: same files, same name
    assert plan["ca_generations"] == [{"generation": 1, "cn": "apigee_mtls cluster CA",
                                       "cert": "ca.pem", "key": "ca-key.pem"}]


@pytest.mark.parametrize("tls, gens", [
    ({"ca_trust": [2]}, [1, 2]),                       # 1. roll: 2 created and trusted
    ({"ca_generation": 2, "ca_trust": [1]}, [2, 1]),   # 2. certificates re-issued by 2
    ({"ca_generation": 2}, [2]),                       # 3. 1 dropped
    ({"ca_generation": 2, "ca_trust": [5, 1, 3]}, [2, 1, 3, 5]),
    ({"ca_generation": 3, "ca_trust": None}, [3]),
])
def test_ca_generations_current_first_then_trusted_ascending(topo5, tls, gens):
    topo5["tls"] = tls
    plans = all_plans(topo5)
    for plan in plans.values():
        assert [c["generation"] for c in plan["ca_generations"]] == gens
    assert plans["n1"]["ca_generations"] == plans["n5"]["ca_generations"]
    assert amp.normalize(topo5)["tls"]["ca_trust"] == sorted(gens[1:])


def test_ca_generation_files_and_names():
    assert amp.ca_file_names(1) == {"cert": "ca.pem", "key": "ca-key.pem"}
    assert amp.ca_file_names(12) == {"cert": "ca-12.pem", "key": "ca-key-12.pem"}
    assert amp.ca_common_name(1) == "apigee_mtls cluster CA"
    assert amp.ca_common_name(2) == "apigee_mtls cluster CA generation 2"
    for gen in (1, 2, 9, 10, 123):
        names = amp.ca_file_names(gen)
        assert amp.ca_file_generation(names["cert"]) == gen
        assert amp.ca_file_generation(names["key"]) == gen
    for other in ("ca-1.pem", "ca-key-1.pem", "ca-0.pem", "ca-02.pem", "ca.pem.tmp",
                  "agent.pem", "ca-x.pem", "ca-key.pem.bak", "cakey.pem", "ca-2-key.pem"):
        assert amp.ca_file_generation(other) is None, other


def test_ca_generation_names_are_distinct_and_short():
    names = {amp.ca_common_name(g) for g in range(1, 1000)}
    assert len(names) == 999
    assert max(len(n) for n in names) <= 64  # X.520 upper bound of a common name


def test_ca_generations_in_plan_are_copies(topo5):
    topo5["tls"] = {"ca_trust": [2]}
    plan = amp.plan(topo5, "n1")
    plan["tls"]["ca_trust"].append(7)
    assert amp.plan(topo5, "n1")["tls"]["ca_trust"] == [2]
    assert topo5["tls"] == {"ca_trust": [2]}


@pytest.mark.parametrize("tls, key, fragment", [
    ({"ca_generation": 0}, "ca_generation", "expected a CA generation, an integer >= 1"),
    ({"ca_generation": "2"}, "ca_generation", "found string '2'"),
    ({"ca_generation": True}, "ca_generation", "found boolean true"),
    ({"ca_trust": 2}, "ca_trust", "expected a list of CA generations"),
    ({"ca_trust": [2, -1]}, "ca_trust:1", "found integer -1"),
    ({"ca_trust": [2.0]}, "ca_trust:0", "found number 2.0"),
    ({"ca_trust": [1]}, "ca_trust:0", "generation 1 is ca_generation"),
    ({"ca_generation": 3, "ca_trust": [2, 3]}, "ca_trust:1", "generation 3 is ca_generation"),
    ({"ca_trust": [2, 3, 2]}, "ca_trust:2", "duplicate generation 2"),
])
def test_ca_generation_validation(tls, key, fragment):
    with pytest.raises(amp.PillarError) as info:
        amp.validate(minimal(tls=tls))
    assert info.value.key == "apigee_mtls:tls:" + key, str(info.value)
    assert fragment in info.value.message, str(info.value)


def test_certificate_sans(topo5):
    node_by_id(topo5, "n1")["fqdn"] = "n1.lab.example"
    server = amp.plan(topo5, "n1")["certificate"]
    assert server == {
        "cn": "n1",
        "dns_sans": ["localhost", "server.dc-1.consul", "client.dc-1.consul",
                     "cli.dc-1.consul", "n1.lab.example", "n1"],
        "ip_sans": ["10.77.0.11", "127.0.0.1", "::1"],
    }
    client = amp.plan(topo5, "n4")["certificate"]
    assert client["dns_sans"] == ["localhost", "client.dc-1.consul", "cli.dc-1.consul",
                                  "n4"]


def test_server_san_only_on_servers(topo12):
    for node_id, plan in all_plans(topo12).items():
        dc = plan["datacenter"]
        has = "server.{}.consul".format(dc) in plan["certificate"]["dns_sans"]
        assert has == plan["is_server"], node_id
        assert "client.{}.consul".format(dc) in plan["certificate"]["dns_sans"]


def test_underscore_id_is_not_a_dns_san():
    pillar = minimal()
    pillar["nodes"][0]["id"] = "node_1"
    cert = amp.plan(pillar, "node_1")["certificate"]
    assert cert["cn"] == "node_1"
    assert "node_1" not in cert["dns_sans"]


# ---------------------------------------------------------------------------
# Port report
# ---------------------------------------------------------------------------

def test_port_report(topo5):
    report = amp.port_report(topo5)
    assert list(report) == ["n1", "n2", "n3", "n4", "n5"]
    n4 = report["n4"]
    assert (n4["ip"], n4["datacenter"], n4["egress"], n4["retired"]) == (
        "10.77.0.14", "dc-1", 10703, False)
    assert n4["ingress"][0] == {"service": "pg-5432-10-77-0-14", "component": "postgres",
                                "component_port": 5432, "proxy_port": 10300}
    assert [e["proxy_port"] for e in n4["ingress"]] == [10300, 10301, 10302, 10400, 10401]
    assert n4["upstreams"] == [u["service"] for u in amp.plan(topo5, "n4")["upstreams"]]
    assert "pg-5432-10-77-0-15" in n4["upstreams"]


# ---------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------

def test_same_input_same_output(any_topology):
    again = copy.deepcopy(any_topology)
    for node in any_topology["nodes"]:
        first = amp.plan(any_topology, node["id"])
        second = amp.plan(again, node["id"])
        assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    assert amp.port_report(any_topology) == amp.port_report(again)


def test_plan_is_json_serializable(topo12):
    plan = amp.plan(topo12, "n7")
    text = json.dumps({"services": plan["services"]}, sort_keys=True)
    assert json.loads(text)["services"][0]["meta"]["node"] == "n7"
    assert json.loads(json.dumps(plan["consul_config"])) == plan["consul_config"]


# ---------------------------------------------------------------------------
# Robustness: garbage anywhere raises PillarError, never anything else
# ---------------------------------------------------------------------------

_GARBAGE = [None, True, 0, -1, 70000, 1.5, "", "x", [], [1, "a"], {}, {"a": [None]},
            [{"b": 1}], "10.77.0.11"]


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from _paths(sub, prefix + (key,))
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            yield from _paths(sub, prefix + (i,))


def _replaced(value, path, new):
    value = copy.deepcopy(value)
    if not path:
        return new
    target = value
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = new
    return value


def test_garbage_anywhere_raises_only_pillar_errors():
    base = load_topology("5-node")
    base.update({"tls": {"signer": "n2", "cert_days_valid": 100, "ca_generation": 2,
                         "ca_trust": [1, 3]},
                 "port_ranges": {"zookeeper": [10001, 10099]},
                 "components": {"zookeeper": {"target": {2181: "loopback"}}},
                 "flows": {"router": ["qpid"]},
                 "firewall": {"protected_ports": [22]}, "proxy": {"user": "consul"}})
    base["nodes"][0]["fqdn"] = "n1.lab"
    errors = 0
    for path in list(_paths(base)):
        for junk in _GARBAGE:
            pillar = _replaced(base, path, junk)
            try:
                amp.validate(pillar)
            except amp.PillarError as err:
                errors += 1
                assert err.key.startswith("apigee_mtls"), err
    assert errors > 500


def test_consul_servers_default_to_an_odd_number_of_zookeeper_nodes_at_most_five():
    pillar = load_topology("13-node")
    zk = [n["id"] for n in pillar["nodes"] if "zookeeper" in n["components"]]
    extra = [f"z{i}" for i in range(6)]
    for i, name in enumerate(extra):
        pillar["nodes"].append({"id": name, "ip": f"10.77.0.{60 + i}",
                                "components": ["zookeeper"]})
    model = amp.validate(pillar)
    assert model["servers"] == (zk + extra)[:5]
    assert amp.plan(pillar, extra[-1])["is_server"] is False
    assert amp.plan(pillar, zk[0])["consul_config"]["bootstrap_expect"] == 5


def test_consul_servers_by_list_and_the_errors_that_say_what_to_set():
    pillar = load_topology("5-node")
    pillar.setdefault("consul", {})["servers"] = ["n1", "n4", "n5"]
    model = amp.validate(pillar)
    assert model["servers"] == ["n1", "n4", "n5"]
    assert amp.plan(pillar, "n4")["is_server"] and not amp.plan(pillar, "n2")["is_server"]
    assert amp.plan(pillar, "n2")["consul_config"]["retry_join"] == [
        amp.validate(pillar)["nodes"][i]["ip"] for i in (0, 3, 4)]
    for servers, key, words in (
            (["n1", "n2"], "apigee_mtls:consul:servers", "odd number"),
            (["n1", "n2", "n3", "n4", "n5", "n1"], "apigee_mtls:consul:servers:5", "twice"),
            (["n1", "nx", "n3"], "apigee_mtls:consul:servers:1", "not a node id"),
            ([], "apigee_mtls:consul:servers", "a list of node ids")):
        pillar["consul"]["servers"] = servers
        with pytest.raises(amp.PillarError) as err:
            amp.validate(pillar)
        assert err.value.key == key and words in str(err.value), str(err.value)


# ---------------------------------------------------------------------------
# Intentions at scale: one identity per role
# ---------------------------------------------------------------------------

SCALE_RANGES = {
    "zookeeper": [20000, 20299], "cassandra": [20300, 20599], "openldap": [20600, 20699],
    "postgres": [20700, 20899], "qpid": [20900, 21099], "message-processor": [21100, 21299],
    "router": [21300, 21499], "egress": [21500, 21999],
}


def scaled_13(k):
    """The 13-node layout repeated ``k`` times (``13 * k`` nodes), with ranges wide enough."""
    pillar = load_topology("13-node")
    base = pillar["nodes"]
    pillar["nodes"] = [
        {"id": f"{n['id']}x{i}", "ip": f"10.77.{i}.{int(n['ip'].rsplit('.', 1)[1])}",
         "components": list(n["components"])}
        for i in range(k) for n in base]
    pillar["port_ranges"] = dict(SCALE_RANGES)
    return pillar


@pytest.fixture(scope="module")
def scaled_counts():
    """{nodes: (intentions, ingress services)} at 13, 52 and 208 nodes."""
    counts = {}
    for k in (1, 4, 16):
        pillar = scaled_13(k)
        ingress = sum(len(block) for alloc in amp.allocate_ports(amp.normalize(pillar)).values()
                      for block in alloc["ingress"].values())
        counts[13 * k] = (len(amp.intentions(pillar)), ingress)
    return counts


def test_intentions_grow_linearly_in_nodes(scaled_counts):
    n13, n52, n208 = (scaled_counts[n][0] for n in (13, 52, 208))
    # per-node identities gave 12,721 at 104 nodes and 51,297 at 208 (quadratic)
    assert n52 <= 4 * n13 and n208 <= 16 * n13, scaled_counts
    # exactly linear here: each role's allows grow with the ingress services
    assert (n208 - 1) * 4 == (n52 - 1) * 16 == (n13 - 1) * 64, scaled_counts
    for intentions, ingress in scaled_counts.values():
        roles = {amp.egress_identity(n["components"])
                 for n in load_topology("13-node")["nodes"]}
        assert intentions - 1 <= len(roles) * ingress


def test_a_role_reaches_only_its_flow_table_row(topo13):
    """Planner-level least privilege: every allow of a role is a flow of one of its own
    components, and an identity of a role the flow table does not let reach a destination
    (the UI/Management Server role towards Cassandra's peer port, ZooKeeper's quorum ports
    for anyone but ZooKeeper, Postgres's role towards the routers) has no allow for it."""
    model = amp.normalize(topo13)
    components_of = {amp.egress_identity(n["components"]): n["components"]
                     for n in model["nodes"]}
    services = {}
    for node in model["nodes"]:
        for comp, block in model["allocation"][node["id"]]["ingress"].items():
            for port in block:
                services[amp.service_name(comp, port, node["ip"])] = (comp, port)
    allows = {(i["source"], i["destination"]) for i in amp.intentions(topo13)[1:]}
    for source, dest in allows:
        comp, port = services[dest]
        sources = [c for c in components_of[source] if comp in model["flows"].get(c, ())]
        assert sources, (source, dest)
        assert port not in model["components"][comp]["peer_ports"] or comp in sources
    ms, pg, zk = "egress-ms-ui", "egress-pg", "egress-zk-cass"
    assert {ms, pg, zk} <= set(components_of)
    assert (ms, "cass-7000-10-77-0-11") not in allows
    assert (ms, "zk-2888-10-77-0-11") not in allows and (ms, "zk-2181-10-77-0-11") in allows
    assert not any(s == pg and d.startswith("rt-") for s, d in allows)
    assert (zk, "zk-2888-10-77-0-12") in allows
    # a role no node has gets nothing: an identity outside the cluster's roles is denied
    assert not any(s == "egress-rt" for s, _ in allows)
