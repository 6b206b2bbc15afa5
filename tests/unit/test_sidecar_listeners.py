"""Which sidecar restarts for a change of its listeners (apigee_mtls_restart's
sidecar_listener_action): Consul 1.8's built-in proxy opens new upstream listeners live and
never closes one."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "_utils"))

import apigee_mtls_restart as rs  # noqa: E402  pylint: disable=wrong-import-position

LISTENER = {"address": "10.77.0.11", "port": 10700, "local_service_address": "127.0.0.1",
            "local_service_port": 10700}
UPS = {"zk-2181-n2": 10004, "qpid-5672-n4": 10400}


def _record(ups, bound=None):
    bound = bound if bound is not None else {str(p): d for d, p in ups.items()}
    return dict(LISTENER, upstreams=dict(ups), bound=bound)


def test_a_new_or_stopped_sidecar_starts_on_the_plan():
    for old, running in ((None, True), (_record({"x": 1}), False)):
        act = rs.sidecar_listener_action(old, LISTENER, UPS, running)
        assert act == {"restart": [], "record": _record(UPS), "bind": []}


def test_an_unchanged_sidecar_keeps_running():
    act = rs.sidecar_listener_action(_record(UPS), LISTENER, UPS, True)
    assert act == {"restart": [], "record": _record(UPS), "bind": []}


def test_a_public_listener_that_moves_restarts():
    act = rs.sidecar_listener_action(_record(UPS), dict(LISTENER, port=10701), UPS, True)
    assert act["restart"] == ["port changed"]
    assert act["record"]["bound"] == {"10004": "zk-2181-n2", "10400": "qpid-5672-n4"}


def test_upstreams_moved_to_free_ports_follow_live_and_old_ports_stay_held():
    # a range move: qpid 10400 -> 11400; the proxy keeps 10400 open for the same destination
    moved = dict(UPS, **{"qpid-5672-n4": 11400})
    act = rs.sidecar_listener_action(_record(UPS), LISTENER, moved, True)
    assert act["restart"] == [] and act["bind"] == [11400]
    assert act["record"]["bound"] == {"10004": "zk-2181-n2", "10400": "qpid-5672-n4",
                                      "11400": "qpid-5672-n4"}
    # moving back reuses the listener still open on 10400: nothing to bind, no restart
    back = rs.sidecar_listener_action(act["record"], LISTENER, UPS, True)
    assert back["restart"] == [] and back["bind"] == []
    # a removed upstream's port stays held: the next destination given it needs a restart
    other = {"zk-2181-n2": 10004, "qpid-5672-n5": 10400}
    again = rs.sidecar_listener_action(back["record"], LISTENER, other, True)
    assert again["restart"] == ["qpid-5672-n5: port 10400 is held for qpid-5672-n4"]
    assert again["record"]["bound"] == {"10004": "zk-2181-n2", "10400": "qpid-5672-n5"}


def test_a_record_from_before_bound_counts_its_upstreams_as_held():
    old = dict(LISTENER, upstreams={"a": 10100, "b": 10101})
    assert rs.sidecar_listener_action(old, LISTENER, {"b": 10100}, True)["restart"] == [
        "b: port 10100 is held for a"]
    assert rs.sidecar_listener_action(old, LISTENER, {"a": 10100, "c": 10102},
                                      True)["bind"] == [10102]
