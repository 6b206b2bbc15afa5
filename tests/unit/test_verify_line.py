"""apigee_mtls.verify summary=True: one line per node, details only on failure."""
from conftest import PLANNER as amp


def _result(ok=True, **over):
    checks = {"acl_token": {"ok": True, "file": "/etc/consul.d/acl/agent.token"},
              "members": {"ok": True, "missing": [], "stale_leaving": []},
              "leader": {"ok": True, "leader": "10.77.0.12:8300"},
              "services": {"ok": True, "count": 11, "problems": []},
              "leaf": {"ok": True, "service": "egress-10-77-0-11"},
              "firewall": {"ok": True, "drifted": [], "ipv6": "as planned"},
              "upstreams": {"ok": True, "count": 38, "failed": []}}
    for name, check in over.items():
        checks[name] = dict(checks[name], **check)
    return {"ok": ok and all(c["ok"] for c in checks.values()), "checks": checks}


def test_a_healthy_node_is_one_line_of_counts():
    assert amp.verify_line(_result()) == (
        "OK: ACL token present, members all present, leader 10.77.0.12:8300, 11 sidecars "
        "passing, leaf certificate issued, firewall as planned (IPv6: as planned), "
        "38 upstreams answer")


def test_a_failing_node_names_only_what_failed():
    line = amp.verify_line(_result(
        members={"ok": False, "missing": ["n5"]},
        upstreams={"ok": False, "failed": ["pg-5432-10-77-0-15", "qpid-5672-10-77-0-15"]}))
    assert line == ("FAILED: members missing: n5; upstreams: 2 of 38 fail "
                    "(pg-5432-10-77-0-15, qpid-5672-10-77-0-15)")


def test_errors_and_non_members():
    assert amp.verify_line({"ok": False, "error": "local Consul agent not answering: x"}) == \
        "FAILED: local Consul agent not answering: x"
    assert amp.verify_line({"ok": True, "member": False}).startswith("OK: not in")


def test_a_leader_only_port_without_its_leader_does_not_fail_the_upstreams_check():
    """ZooKeeper's 2888 is served by the current leader only: a real follower has no listener
    behind its sidecar, and the probe through the mesh is closed however healthy it is."""
    ups = [{"service": "zk-2181-10-77-0-12", "leader_only": False},
           {"service": "zk-2888-10-77-0-12", "leader_only": True},
           {"service": "zk-2888-10-77-0-13", "leader_only": True},
           {"service": "cass-9042-10-77-0-13", "leader_only": False}]
    probes = {"zk-2181-10-77-0-12": {"ok": True}, "zk-2888-10-77-0-12": {"ok": False},
              "zk-2888-10-77-0-13": {"ok": True}, "cass-9042-10-77-0-13": {"ok": True}}
    check = amp.upstream_verdict(ups, probes)
    assert check == {"ok": True, "count": 4, "failed": [],
                     "leader_only_unanswered": ["zk-2888-10-77-0-12"]}
    assert amp.verify_line(_result(upstreams=check)).endswith(
        "3 upstreams answer (1 leader-only not serving here)")
    # any other port that does not answer fails it
    probes["zk-2181-10-77-0-12"] = {"ok": False}
    check = amp.upstream_verdict(ups, probes)
    assert not check["ok"] and check["failed"] == ["zk-2181-10-77-0-12"]


def test_only_zookeepers_quorum_port_is_leader_only_in_the_plan(topo5):
    ups = amp.plan(topo5, "n1")["upstreams"]
    leader_only = {(u["component"], u["component_port"]) for u in ups if u["leader_only"]}
    assert leader_only == {("zookeeper", 2888)}
    assert sum(u["leader_only"] for u in ups) == 2  # n2's and n3's
