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
