"""labctl passes salt's own flags through (``labctl salt -C 'not n5' test.ping``): argparse
refused them before."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "lab"))

import labctl  # noqa: E402  pylint: disable=wrong-import-position


def test_salt_and_apply_pass_every_argument_through(monkeypatch):
    seen = []
    monkeypatch.setitem(labctl.PASSTHROUGH, "salt", lambda args: seen.append(("salt", args.argv)))
    monkeypatch.setitem(labctl.PASSTHROUGH, "apply",
                        lambda args: seen.append(("apply", args.argv)))
    assert labctl.main(["salt", "-C", "not n5", "test.ping", "--out=json"]) == 0
    assert labctl.main(["apply", "test=True"]) == 0
    assert seen == [("salt", ["-C", "not n5", "test.ping", "--out=json"]),
                    ("apply", ["test=True"])]
