"""The day-2 table's reading of the lab's records (bench/day2_report.py): the last session of
each lab, so that ``make test``'s stand-in and real-datastore sessions both show."""
import doctest
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import day2_report  # noqa: E402  pylint: disable=wrong-import-position


def test_each_lab_shows_its_last_session_with_operations(tmp_path, monkeypatch, capsys):
    log = tmp_path / "day2-traffic.jsonl"
    recs = [{"session": "t1", "topology": "5-node.yaml", "components": "standin"},
            {"operation": "old", "new_failed": 9},
            {"session": "t2", "topology": "5-node.yaml", "components": "standin"},
            {"operation": "gossip key rotation", "new_failed": 0},
            {"session": "t3", "topology": "5-node.yaml", "components": "real"},
            {"operation": "real datastores: clean", "new_failed": 28},
            {"session": "t4", "topology": "13-node.yaml", "components": "real"}]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "day2.json"
    monkeypatch.setattr(day2_report, "LOG", str(log))
    monkeypatch.setattr(day2_report, "OUT", str(out))
    monkeypatch.setattr(sys, "argv", ["day2_report.py"])
    day2_report.main()
    printed = capsys.readouterr().out
    assert "gossip key rotation" in printed and "real datastores: clean" in printed
    assert "old" not in printed.split()  # an earlier session of the same lab
    written = json.loads(out.read_text())
    assert [s["session"]["session"] for s in written] == ["t2", "t3"]


def test_the_docstring_examples_hold():
    assert doctest.testmod(day2_report).failed == 0
