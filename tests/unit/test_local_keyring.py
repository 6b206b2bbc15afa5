"""A node that was off during a gossip key rotation catches up (issue 16): the planner decides
whether its own keyring file is repaired (only when the pillar key is not its primary key AND
it is cut off from its peers), and what the file then holds (the pillar key first, the keys
already there after it)."""

import pytest

import apigee_mtls_plan as amp  # registered by conftest.py
from conftest import load_topology

NEW = amp.gossip_keygen()
OLD = amp.gossip_keygen()
OLDER = amp.gossip_keygen()
PEERS = ["n1", "n2", "n3", "n5"]


# --------------------------------------------------------------------------------------------
# planner: the rule
def test_no_keyring_file_yet_is_left_to_the_first_start():
    out = amp.local_keyring_action(None, NEW, [], PEERS)
    assert out == {"action": "none", "keys": None, "reason": out["reason"]}
    assert "first start" in out["reason"]


@pytest.mark.parametrize("alive", [None, [], PEERS])
def test_pillar_key_primary_needs_nothing_whoever_is_alive(alive):
    out = amp.local_keyring_action([NEW, OLD], NEW, alive, PEERS)
    assert out["action"] == "none" and out["keys"] == [NEW, OLD]


def test_pillar_key_missing_and_peers_not_known_asks_for_them():
    out = amp.local_keyring_action([OLD], NEW, None, PEERS)
    assert out["action"] == "unknown" and out["keys"] == [OLD]


@pytest.mark.parametrize("alive", [["n1", "n2"], PEERS, ["n1", "n2", "n4-self", "retired"]])
def test_a_node_that_still_gossips_is_left_to_the_signers_rotation(alive):
    # half or more of its peers alive: rewriting now would make it encrypt with a key its
    # peers do not have yet
    out = amp.local_keyring_action([OLD], NEW, alive, PEERS)
    assert out["action"] == "none" and out["keys"] == [OLD]
    assert "rotation" in out["reason"]


@pytest.mark.parametrize("alive", [[], ["n1"], ["n1", "stranger", "n4-self"]])
def test_a_cut_off_node_without_the_key_is_repaired_pillar_key_first(alive):
    out = amp.local_keyring_action([OLD], NEW, alive, PEERS)
    assert out["action"] == "repair" and out["keys"] == [NEW, OLD]
    assert "cut off" in out["reason"]


def test_a_cut_off_node_off_between_install_and_use_gets_the_key_made_primary():
    out = amp.local_keyring_action([OLD, NEW], NEW, [], PEERS)
    assert out["action"] == "repair" and out["keys"] == [NEW, OLD]
    assert "not primary" in out["reason"]


def test_repair_keeps_every_other_key_once_in_order():
    out = amp.local_keyring_action([OLD, OLDER, OLD], NEW, [], PEERS)
    assert out["keys"] == [NEW, OLD, OLDER]
    assert amp.keyring_with_primary(None, NEW) == [NEW]
    assert amp.keyring_with_primary([OLD, NEW, OLDER], NEW) == [NEW, OLD, OLDER]


def test_no_expected_peer_is_never_cut_off():
    out = amp.local_keyring_action([OLD], NEW, [], [])
    assert out["action"] == "none"


def test_no_key_in_any_reason():
    cases = [(None, []), ([NEW], []), ([OLD], None), ([OLD], PEERS), ([OLD], []),
             ([OLD, NEW], [])]
    for keys, alive in cases:
        reason = amp.local_keyring_action(keys, NEW, alive, PEERS)["reason"]
        assert NEW not in reason and OLD not in reason


# --------------------------------------------------------------------------------------------
# planner: the peers a node expects in its LAN pool
def test_keyring_peers_are_the_data_centers_other_active_nodes():
    pillar = load_topology("12-node-2dc")
    assert amp.plan(pillar, "n8")["keyring"] == {
        "peers": ["n7", "n9", "n10", "n11", "n12"], "server": True}
    assert amp.plan(pillar, "n4")["keyring"] == {
        "peers": ["n1", "n2", "n3", "n5", "n6"], "server": False}


def test_a_retired_node_is_nobodys_peer():
    pillar = load_topology("5-node")
    pillar["nodes"][-1]["retired"] = True
    gone = pillar["nodes"][-1]["id"]
    assert amp.plan(pillar, gone)["keyring"] is None
    assert gone not in amp.plan(pillar, pillar["nodes"][0]["id"])["keyring"]["peers"]
