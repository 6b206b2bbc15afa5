"""ZooKeeper quorum recovery, mesh against direct (``bench/run.py --only zookeeper``), on a lab
booted with real datastores (``make lab COMPONENTS=real``: a real ZooKeeper 3.8 ensemble,
lab/real.py). Issue 12's targets: within 2x of direct, and a full restart under 30 s (the
vendor documents 3 to 5 minutes for its mesh).

Three events, each timed from the moment it is caused to a *serving* ensemble, polled every
0.2 s on every ZooKeeper node over its own loopback (``srvr``, the four-letter word: a server
that is not serving answers "not currently serving requests", one that is gives its mode):

* **restart**: every ZooKeeper stopped, then all started at once; until one leader and every
  other node a follower;
* **leader killed**: ``SIGKILL`` to the leader's JVM (systemd restarts it after 2 s); until
  another node is leader with a quorum of followers;
* **leader silent**: every TCP packet to and from the leader's node dropped but Salt's (its
  peers see silence, not a reset: ``iptables -I INPUT/OUTPUT ! -i/-o lo -p tcp`` and not
  Salt's ports 4505-4506 ``-j DROP`` inside that node, removed afterwards); until another
  node leads a quorum.

Each event runs ``--dp-repeats`` times with the mesh (``salt '*' state.apply apigee_mtls``
applied), then the mesh is cleaned away (``salt '*' state.apply apigee_mtls.clean``: the
ensemble talks directly by node IP, as without the formula), the same events run, and the
formula is applied again. Medians are reported with the mesh/direct ratio. Nothing is
asserted.
"""
import concurrent.futures
import json
import subprocess
import time

import run as h  # bench/run.py: lab helpers

POLL = 0.2
SRVR = """
import socket, sys, time, json
deadline = time.time() + float(sys.argv[1])
out = []
while time.time() < deadline:
    mode = None
    try:
        s = socket.create_connection(("127.0.0.1", 2181), timeout=1)
        s.settimeout(1)
        s.sendall(b"srvr")
        buf = b""
        while True:
            c = s.recv(4096)
            if not c:
                break
            buf += c
        s.close()
        for line in buf.decode(errors="replace").splitlines():
            if line.startswith("Mode:"):
                mode = line.split(":", 1)[1].strip()
    except OSError:
        pass
    out.append((time.time(), mode))
    if sys.argv[2] == "once":
        break
    time.sleep(%(poll)s)
print(json.dumps(out))
""" % {"poll": POLL}


_node = h.node_run


def modes_now(labctl, nodes):
    """``{node: mode or None}``, one ``srvr`` each, in parallel."""
    with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:
        futs = {n: pool.submit(_node, labctl, n, ["python3", "-c", SRVR, "5", "once"])
                for n in nodes}
    return {n: json.loads(f.result().stdout)[0][1] for n, f in futs.items()}


def served_at(samples, nodes, need, exclude=None):
    """The first time at which ``need`` of ``nodes`` (not ``exclude``) serve with exactly one
    leader among them, from per-node ``[(time, mode)]`` samples; ``None`` if never.

    >>> s = {"a": [(1, None), (2, "follower")], "b": [(1, "leader"), (2, "leader")],
    ...      "c": [(1, None), (3, "follower")]}
    >>> served_at(s, ["a", "b", "c"], 3), served_at(s, ["a", "b", "c"], 2)
    (3, 2)
    >>> served_at(s, ["a", "b", "c"], 2, exclude="b") is None
    True
    """
    live = [n for n in nodes if n != exclude]
    times = sorted({t for n in live for t, _ in samples[n]})
    for t in times:
        now = {}
        for n in live:
            mode = None
            for ts, m in samples[n]:
                if ts > t:
                    break
                mode = m
            now[n] = mode
        serving = [m for m in now.values() if m in ("leader", "follower")]
        if len(serving) >= need and serving.count("leader") == 1:
            return t
    return None


def watch(labctl, nodes, seconds, action):
    """Start a ``srvr`` poller on every node for ``seconds``, run ``action()`` (returns the
    event's start time), collect the samples; returns ``(t0, samples)``."""
    with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:
        futs = {n: pool.submit(_node, labctl, n, ["python3", "-c", SRVR, str(seconds), "loop"],
                               seconds + 60) for n in nodes}
        time.sleep(1.0)
        t0 = action()
        samples = {n: json.loads(f.result().stdout) for n, f in futs.items()}
    return t0, samples


def wait_full(labctl, nodes, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        modes = modes_now(labctl, nodes)
        vals = list(modes.values())
        if vals.count("leader") == 1 and vals.count("follower") == len(nodes) - 1:
            return modes
        time.sleep(1)
    raise RuntimeError(f"ZooKeeper ensemble not back within {timeout}s: {modes}")


def _all(labctl, nodes, argv):
    with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:
        for f in [pool.submit(_node, labctl, n, argv) for n in nodes]:
            f.result()


def event_restart(labctl, nodes, window):
    _all(labctl, nodes, ["systemctl", "stop", "zookeeper"])

    def act():
        t0 = time.time()
        _all(labctl, nodes, ["systemctl", "start", "zookeeper"])
        return t0
    t0, samples = watch(labctl, nodes, window, act)
    at = served_at(samples, nodes, len(nodes))
    return None if at is None else at - t0


def event_leader(labctl, nodes, window, silent):
    leader = next(n for n, m in wait_full(labctl, nodes).items() if m == "leader")
    # Salt's own connections stay (a minion whose publish connection went silent for a
    # minute stopped answering the master: never lock anyone out), ZooKeeper's peers see
    # silence
    rules = [["iptables", "-w", "-I", "INPUT", "1", "!", "-i", "lo", "-p", "tcp", "!",
              "--sport", "4505:4506", "-j", "DROP"],
             ["iptables", "-w", "-I", "OUTPUT", "1", "!", "-o", "lo", "-p", "tcp", "!",
              "--dport", "4505:4506", "-j", "DROP"]]

    def act():
        t0 = time.time()
        if silent:
            for rule in rules:
                _node(labctl, leader, rule)
        else:
            _node(labctl, leader, ["systemctl", "kill", "--kill-who=main", "-s", "SIGKILL",
                                   "zookeeper"])
        return t0
    others = [n for n in nodes if n != leader]
    try:
        t0, samples = watch(labctl, others, window, act)
    finally:
        if silent:
            for rule in rules:
                _node(labctl, leader, [x if x != "-I" else "-D" for x in rule if x != "1"],
                      check=False)
    at = served_at(samples, others, len(nodes) // 2 + 1)
    wait_full(labctl, nodes)
    return None if at is None else at - t0


EVENTS = {
    "restart": lambda labctl, nodes, w: event_restart(labctl, nodes, w),
    "leader killed": lambda labctl, nodes, w: event_leader(labctl, nodes, w, silent=False),
    "leader silent": lambda labctl, nodes, w: event_leader(labctl, nodes, w, silent=True),
}


def _salt_apply(labctl, sls):
    proc = subprocess.run(labctl.salt_cmd(["*", "state.apply", sls, "-t", "900",
                                           "--out=json", "--static"]),
                          capture_output=True, text=True, timeout=1200, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"salt '*' state.apply {sls}: rc {proc.returncode}: "
                           f"{proc.stdout[-800:]}")


def section_zookeeper(args):
    """Run the recovery benchmark on a running real-datastore lab; ``(result, None)`` or
    ``(None, why it was skipped)``."""
    labctl, why = h.lab_for("zookeeper", args)
    if labctl is None:
        return None, why
    state = labctl.load_state()
    if state.get("components") != "real":
        return None, "zookeeper: skipped, the lab runs stand-ins (make lab COMPONENTS=real)"
    model = labctl.planner.normalize(labctl.load_topology(state["topology"]))
    nodes = [n["id"] for n in labctl.real.real_nodes(model, "zookeeper")]
    window = int(args.zk_window)
    result = {"meta": h.section_meta(), "nodes": nodes, "poll_s": POLL,
              "settings": {"repeats": args.dp_repeats, "window_s": window}, "runs": {}}
    try:
        for path in ("mesh", "direct"):
            if path == "direct":
                h.say("zookeeper: cleaning the mesh away (apigee_mtls.clean)")
                _salt_apply(labctl, "apigee_mtls.clean")
            wait_full(labctl, nodes)
            runs = result["runs"][path] = {e: [] for e in EVENTS}
            for rep in range(args.dp_repeats):
                for name, fn in EVENTS.items():
                    took = fn(labctl, nodes, window)
                    runs[name].append(took)
                    h.say(f"  {name:13} {path:6} #{rep + 1}: "
                          + (f"{took:.1f} s" if took is not None else f"> {window} s"))
    finally:
        if result["runs"].get("direct") is not None:
            h.say("zookeeper: applying the formula again")
            _salt_apply(labctl, "apigee_mtls")
    summary = {}
    for path, runs in result["runs"].items():
        summary[path] = {e: h.median(x for x in v if x is not None) if any(
            x is not None for x in v) else None for e, v in runs.items()}
    if "direct" in summary:
        summary["ratio_mesh_over_direct"] = {
            e: (summary["mesh"][e] / summary["direct"][e]
                if summary["mesh"][e] and summary["direct"][e] else None) for e in EVENTS}
    result["summary"] = summary
    result["meta"]["loadavg_after"] = h.loadavg()
    return result, None


def print_zookeeper(res):
    s = res["summary"]
    rows = [[e, h.fmt(s["mesh"][e], ".1f"), h.fmt(s.get("direct", {}).get(e), ".1f"),
             h.fmt(s.get("ratio_mesh_over_direct", {}).get(e), ".2f") + "x"] for e in EVENTS]
    h.say(f"\nZooKeeper quorum recovery ({', '.join(res['nodes'])}; seconds to a serving "
          f"ensemble, medians of {res['settings']['repeats']}, polled every {res['poll_s']} s; "
          f"load {res['meta'].get('loadavg_before')} -> {res['meta'].get('loadavg_after')})")
    h.say(h.table(["event", "mesh (s)", "direct (s)", "mesh/direct"], rows))
