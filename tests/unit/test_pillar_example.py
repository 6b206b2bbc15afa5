"""pillar.example is the reference documentation of the pillar: it must stay valid and
complete (every key the planner accepts appears in it)."""
import os
import re

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(REPO, "pillar.example")


def _example():
    with open(EXAMPLE, encoding="utf-8") as fh:
        return yaml.safe_load(fh)["apigee_mtls"]


def test_pillar_example_is_valid_once_the_gossip_key_is_set(amp):
    data = _example()
    with pytest.raises(ValueError) as err:  # the placeholder is refused, by name
        amp.normalize(data)
    assert err.value.key == "apigee_mtls:secrets:gossip_key"
    data["secrets"]["gossip_key"] = amp.gossip_keygen()
    model = amp.normalize(data)
    assert [n["id"] for n in model["nodes"]] == ["n1", "n2", "n3", "n4", "n5"]


def test_pillar_example_documents_every_key(amp):
    text = open(EXAMPLE, encoding="utf-8").read()
    keys = set(amp._TOP_KEYS) | set(amp._NODE_KEYS) | set(amp._TLS_KEYS) | set(amp._CONSUL_KEYS)
    keys |= set(amp._INSTALL_KEYS) | set(amp._FIREWALL_KEYS)
    keys |= {"user", "ports", "peer_ports", "target"} | set(amp.LOOKUP_KEYS)
    missing = [k for k in sorted(keys) if not re.search(rf"(^|\s|#\s*){re.escape(k)}:", text, re.M)]
    assert not missing, f"pillar.example does not document: {missing}"


def test_lookup_keys_are_the_os_parameters(amp):
    """The validator's list of overridable OS parameters is the formula's parameters."""
    with open(os.path.join(REPO, "formula/apigee_mtls/parameters/defaults.yaml"),
              encoding="utf-8") as fh:
        assert set(amp.LOOKUP_KEYS) == set(yaml.safe_load(fh))


def test_lookup_must_be_a_mapping_of_known_parameters(amp):
    data = _example()
    data["secrets"]["gossip_key"] = amp.gossip_keygen()
    data["lookup"] = {"pkgs": ["iptables"]}
    amp.normalize(data)
    data["lookup"] = ["pkgs"]
    with pytest.raises(ValueError) as err:
        amp.normalize(data)
    assert err.value.key == "apigee_mtls:lookup"
    data["lookup"] = {"pkg": ["iptables"]}
    with pytest.raises(ValueError) as err:
        amp.normalize(data)
    assert err.value.key == "apigee_mtls:lookup:pkg" and "did you mean 'pkgs'" in str(err.value)
