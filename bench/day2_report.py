#!/usr/bin/env python3
"""The day-2 operations table: what the traffic harness (lab/traffic.py) counted while each
operation ran in the lab tests (tests/lab/conftest.py's ``under_traffic`` records one JSON line
per operation in /var/cache/apigee-mtls-lab/day2-traffic.jsonl). Prints a table and writes
bench/day2.json.

    make day2-report        # after `make test` (or any day-2 lab test)
    make bench              # prints it too, after the other benchmarks (--if-present)
"""
import json
import os
import sys

LOG = os.path.join(os.environ.get("LAB_CACHE", "/var/cache/apigee-mtls-lab"), "day2-traffic.jsonl")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "day2.json")
COLUMNS = (("operation", "{:<42}"), ("nodes", "{:>5}"), ("seconds", "{:>7}"),
           ("new_ok", "{:>7}"), ("new_failed", "{:>10}"), ("long_ok", "{:>7}"),
           ("long_broken", "{:>11}"), ("slowest_new", "{:>11}"), ("no_leader_samples", "{:>9}"),
           ("leader_changes", "{:>9}"))


def latest_sessions(records):
    """Per lab (topology, components and data plane), the operations of its last session
    that recorded any, in the order those sessions ran: ``[(operations, marker)]``. A
    session starts at the ``{"session": ...}`` line a lab session writes when it boots its
    lab (records written before markers existed form a session whose marker is ``None``).
    ``make test`` runs day-2 operations on the stand-in lab and on the real-datastore lab:
    both show.

    >>> recs = [{"session": "a", "topology": "5"}, {"operation": "x"},
    ...         {"session": "b", "topology": "5", "components": "real"}, {"operation": "y"},
    ...         {"session": "c", "topology": "13"},
    ...         {"session": "d", "topology": "5"}, {"operation": "z"}]
    >>> [(ops, m["session"]) for ops, m in latest_sessions(recs)]
    [([{'operation': 'y'}], 'b'), ([{'operation': 'z'}], 'd')]
    """
    sessions, current, marker = [], [], None
    for rec in records:
        if "session" in rec:
            if current:
                sessions.append((current, marker))
            current, marker = [], rec
        else:
            current.append(rec)
    if current:
        sessions.append((current, marker))
    latest = {}
    for ops, mark in sessions:
        key = None if mark is None else (mark.get("topology"),
                                         mark.get("components", "standin"),
                                         mark.get("data_plane", "builtin"))
        latest.pop(key, None)
        latest[key] = (ops, mark)
    return list(latest.values())


def main():
    if not os.path.exists(LOG):
        if "--if-present" in sys.argv[1:]:
            print(f"day-2 table: no records in {LOG} (run make test first)")
            return
        sys.exit(f"no day-2 records in {LOG}: run the lab tests first (make test)")
    with open(LOG, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    short = {"no_leader_samples": "no_leader", "leader_changes": "elections"}
    header = " ".join(fmt.format(short.get(name, name)) for name, fmt in COLUMNS)
    report, count = [], 0
    for rows, session in latest_sessions(records):
        if session:
            print(f"\nlab session of {session['session']} ({session['topology']}, "
                  f"{session.get('components', 'standin')}, "
                  f"{session.get('data_plane', 'builtin')} data plane)")
        print(header)
        print("-" * len(header))
        for row in rows:
            print(" ".join(fmt.format(row.get(name, "")) for name, fmt in COLUMNS))
        report.append({"session": session, "operations": rows})
        count += len(rows)
    with open(OUT, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    print(f"\n{count} operations in {len(report)} lab session(s); written to {OUT}")


if __name__ == "__main__":
    main()
