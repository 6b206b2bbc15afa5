"""The traffic harness's arithmetic (lab/traffic.py): what it counts as an election and how
it sums the nodes' reports."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "lab"))

import traffic  # noqa: E402  pylint: disable=wrong-import-position


def test_leader_changes_count_elections_not_gaps():
    # a leader, then an agent restarting (None), then no leader, then the same leader: none
    assert traffic.leader_changes([(0, "a"), (1, None), (2, ""), (3, "a")]) == 0
    # a leader restart: another server wins
    assert traffic.leader_changes([(0, "a"), (1, ""), (2, "b"), (3, "b")]) == 1
    assert traffic.leader_changes([(0, "a"), (1, "b"), (2, "a")]) == 2
    assert traffic.leader_changes([]) == 0


def _report(no_leader=0, agent_down=0, changes=0, new_failed=0):
    target = {"target": {"node": "n2", "component": "zookeeper"}, "new_ok": 10,
              "new_failed": new_failed, "long_ok": 5, "long_broken": 0, "max_gap": 0.5,
              "slowest_new": 0.1, "failures": [[1.5, "new", "reset"]] * new_failed}
    return {"targets": [target], "leader_samples": 10, "no_leader_samples": no_leader,
            "agent_down_samples": agent_down, "leader_changes": changes}


def test_summarize_keeps_agent_restarts_apart_from_missing_leaders():
    tot = traffic.summarize({"n1": _report(no_leader=2, agent_down=3, changes=1),
                             "n3": _report(agent_down=4, changes=1, new_failed=1)})
    assert tot["no_leader_samples"] == 2
    assert tot["agent_down_samples"] == 7
    # every agent sees the same election: counted once
    assert tot["leader_changes"] == 1
    assert tot["new_failed"] == 1 and tot["failed_flows"] == ["n3 -> n2 zookeeper"]
    assert tot["failure_samples"] == ["n3 -> n2 zookeeper at 1.5s (new): reset"]


def test_failure_samples_show_the_new_connections_that_failed_first():
    def report(new_failed, long_broken):
        failures = ([[2.0, "long", "reset"]] * long_broken) + ([[3.0, "new", "refused"]]
                                                               * new_failed)
        return {"targets": [{"target": {"node": "n2", "component": "zookeeper"}, "new_ok": 9,
                             "new_failed": new_failed, "long_ok": 5, "long_broken": long_broken,
                             "max_gap": 1.0, "slowest_new": 0.1, "failures": failures}],
                "leader_samples": 1, "no_leader_samples": 0}
    # eight flows broke long-lived connections; one flow also failed one new connection
    reports = {f"n{i}": report(0, 3) for i in range(3, 11)}
    reports["n1"] = report(1, 3)
    tot = traffic.summarize(reports)
    assert tot["new_failed_flows"] == {"n1 -> n2 zookeeper": 1}
    assert tot["failure_samples"][0] == "n1 -> n2 zookeeper at 3.0s (new): refused"
    assert len(tot["failure_samples"]) == 12
