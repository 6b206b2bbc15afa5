"""Issue 14: sizing that says what fits. README's table is the planner's own figures
(``sizing``), and a range too small for the topology fails with an error that says how many
nodes it fits and what to set, proposing a free range."""
import pathlib

import pytest

import apigee_mtls_plan as amp  # registered by conftest.py
from conftest import load_topology

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def _pillar(routers):
    pillar = {k: v for k, v in load_topology("5-node").items() if k != "nodes"}
    pillar["nodes"] = [{"id": f"z{i}", "ip": f"10.77.0.{11 + i}",
                        "components": ["zookeeper", "cassandra", "postgres"]}
                       for i in range(3)]
    pillar["nodes"] += [{"id": f"r{i}", "ip": f"10.77.1.{1 + i}",
                         "components": ["router", "message-processor"]}
                        for i in range(routers)]
    return pillar


def test_readme_table_is_the_planners_sizing():
    rows = amp.sizing(amp.validate(load_topology("5-node")))
    text = README.read_text()
    for row in rows:
        line = "| {} {}-{} | {} | {} | {} |".format(
            row["name"], row["range"][0], row["range"][1], row["ports_per_node"],
            row["nodes"], row["limit"])
        assert line in text, line
    assert f"**Cluster maximum: {rows[-1]['nodes']} nodes**" in text
    by_name = {r["name"]: r for r in rows}
    # the figures issue 14 measured: LDAPS 10636 in the router range, 10389 in postgres'
    assert by_name["router"]["nodes"] == 18 and "10636" in by_name["router"]["limit"]
    assert by_name["postgres"]["nodes"] == 29 and "10389" in by_name["postgres"]["limit"]
    assert by_name["egress"]["nodes"] == 100


def test_the_table_holds_at_its_edge_and_the_error_says_what_to_set():
    amp.validate(_pillar(18))
    with pytest.raises(amp.PillarError) as err:
        amp.validate(_pillar(25))
    msg = str(err.value)
    assert err.value.key == "apigee_mtls:port_ranges:router", msg
    assert "fits 18 node(s) of 2 port(s) each" in msg and "at least 50 free ports" in msg
    assert "e.g. [10800, 10849]" in msg and msg.split("e.g. ")[1] in README.read_text()
    pillar = _pillar(25)
    pillar["port_ranges"] = {"router": [10800, 10849]}
    model = amp.validate(pillar)
    assert {r["name"]: r["nodes"] for r in amp.sizing(model)}["router"] == 25


def test_a_suggested_range_avoids_forbidden_ports_and_other_ranges():
    assert amp.suggest_range(10, {10005}, [], start=10000) == [10100, 10109]
    assert amp.suggest_range(10, set(), [[10000, 10150]], start=10000) == [10200, 10209]
    assert amp.suggest_range(40000, set(), [], start=10000) is None
