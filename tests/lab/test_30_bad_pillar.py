"""A bad pillar stops `salt '*' state.apply apigee_mtls` on every node with one error that
names the offending key, and changes nothing anywhere (checked on the running cluster)."""
import copy

import pytest

BAD = {
    "bad gossip key": (lambda p: p["secrets"].update(gossip_key="not-base64!"),
                       "apigee_mtls:secrets:gossip_key"),
    "duplicate ip": (lambda p: p["nodes"][4].update(ip=p["nodes"][3]["ip"]),
                     "apigee_mtls:nodes:4:ip"),
    "two zookeepers": (lambda p: p["nodes"][2]["components"].remove("zookeeper"),
                       "apigee_mtls:nodes"),
    "range on a consul port": (lambda p: p.setdefault("port_ranges", {}).update(
        router=[8290, 8310]), "apigee_mtls:port_ranges:router"),
    "unknown component": (lambda p: p["nodes"][0]["components"].append("kafka"),
                          "apigee_mtls:nodes:0:components"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_pillar_fails_everywhere_naming_the_key_and_changes_nothing(applied, case):
    lab = applied
    mutate, key = BAD[case]
    pillar = copy.deepcopy(lab.pillar)
    mutate(pillar)
    before = {n: lab.fingerprint(n)[0] for n in lab.nodes}
    try:
        lab.set_pillar(pillar)
        ret = lab.apply()
    finally:
        lab.set_pillar(lab.pillar)
    for node in lab.nodes:
        errors = ret[node]
        # a render error: a list of messages, not state results
        assert isinstance(errors, list), f"{node}: states ran with a bad pillar: {str(errors)[:300]}"
        text = " ".join(errors)
        assert f"apigee_mtls: invalid pillar: {key}:" in text, (node, text[:500])
        assert lab.fingerprint(node)[0] == before[node], f"{node} changed under a bad pillar"
