"""The ZooKeeper recovery benchmark's reading of its samples (bench/zookeeper.py): when the
ensemble serves again, from per-node ``srvr`` polls."""
import doctest
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import zookeeper  # noqa: E402  pylint: disable=wrong-import-position


def test_served_at_needs_one_leader_and_enough_serving_members():
    samples = {
        "n1": [(10.0, "leader"), (10.2, None), (10.4, None), (13.0, "follower")],
        "n2": [(10.0, "follower"), (10.2, None), (11.4, "leader")],
        "n3": [(10.0, "follower"), (10.2, None), (12.0, "follower")],
    }
    nodes = ["n1", "n2", "n3"]
    # at 10.0 the old ensemble served; the first time after the event that 3 serve is 13.0
    assert zookeeper.served_at({n: [x for x in s if x[0] > 10.1] for n, s in samples.items()},
                               nodes, 3) == 13.0
    # a quorum of two (n2 leader, n3 follower) serves at 12.0
    assert zookeeper.served_at({n: [x for x in s if x[0] > 10.1] for n, s in samples.items()},
                               nodes, 2) == 12.0
    # two leaders at once are not a serving ensemble
    split = {"n1": [(1.0, "leader")], "n2": [(1.0, "leader")], "n3": [(1.0, "follower")]}
    assert zookeeper.served_at(split, nodes, 3) is None


def test_the_docstring_examples_hold():
    assert doctest.testmod(zookeeper).failed == 0
