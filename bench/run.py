#!/usr/bin/env python3
"""apigee_mtls benchmarks (``make bench``): prints tables, writes bench/results.json.

    .venv/bin/python bench/run.py                       planner, then dataplane if the lab is up
    .venv/bin/python bench/run.py --only planner        [--sizes 100,1000,5000]
    .venv/bin/python bench/run.py --only dataplane      needs a running lab (make lab)
    .venv/bin/python bench/run.py --only native         iperf3/sockperf/ab, mesh vs direct (lab)
    .venv/bin/python bench/run.py --only zookeeper      ZooKeeper quorum recovery, mesh vs
                                  direct (a lab booted with make lab COMPONENTS=real)
    .venv/bin/python bench/run.py --only rollout        DESTROYS and re-creates the lab
                                  [--topology 5-node|13-node|FILE] [--repeat N]

Nothing here asserts on time: the numbers are reported, never judged. The host this was written
for has 2 shared, noisy cores, so every figure is a median over repeats, stages are isolated
from each other (``gc.collect()`` before each), and wherever a ratio is quoted its two sides are
measured in the same run, interleaved (A B, then B A, ...), so drift in background load hits
both sides alike. The load average before and after each section is recorded with the results.

planner (pure, no lab)
    Synthetic pillars of N nodes (default 100, 1,000, 5,000) built by repeating the 13-node
    topology's node list (tests/topologies/13-node.yaml: 3 zookeeper+cassandra, 2 openldap,
    2 ui+management-server, 2 postgres, 2 message-processor+router, 2 qpid), node i getting
    the role of node i mod 13, unique ids and IPs (10.100.0.1, ...). The default proxy port
    ranges (100 ports each) cannot hold more than a few dozen nodes, so ``port_ranges`` are
    computed to fit exactly: consecutive, disjoint ranges from 10800 upwards, sized to
    ports-per-node x hosting nodes, skipping Consul's 8300-8600, the protected ports
    (22/4505/4506), every meshed component port, every Apigee service port and Linux's
    default ephemeral ports 32768-60999 (the planner refuses ranges there).
    Measured, with the planner imported from _utils/apigee_mtls_plan.py:

    * validate+allocate: ``normalize(pillar)`` (validation + port allocation);
    * one node's plan: ``plan(pillar, node_id)`` as a minion calls it (it normalizes the pillar
      itself), for one node of each distinct role; the table shows the heaviest role (the
      management-server nodes: they reach every other component), and the lightest one, chosen
      by upstream count (not by timing, which is noisy); JSON has every role;
    * all nodes' plans: the sum of ``plan()`` over every node, i.e. the CPU the whole cluster
      spends on planning. Measured once when the estimate (sum over roles of nodes x that
      role's median) fits ``--plan-budget`` seconds, otherwise reported as that estimate
      (marked ``~``);
    * ``intentions(pillar)`` (count and time) and ``port_report(pillar)``. Their output grows
      with the square of the cluster (each zookeeper/cassandra node reaches every other one),
      so they are skipped (with the predicted count) when the predicted number of upstream
      entries exceeds ``--max-intentions`` (0 = no limit);
    * peak memory: a separate pass under ``tracemalloc`` (it slows Python down, so it never
      overlaps the timed runs): the peak of memory allocated *by each call* (the input pillar
      is excluded), the largest of normalize / heaviest plan / intentions / port_report.

    Timed stages are repeated ``--planner-repeats`` times (median); a stage whose first run
    takes over 2 s is run 3 times, over 10 s once. Process CPU time is recorded next to wall
    time; their ratio (printed) tells how much other load on the host inflated the figures.

dataplane (needs the running lab; ``labctl status`` must say it is up)
    Between the first management-server node (client, e.g. n1) and the first router node on
    another node (e.g. n2), over the router port 8081, both measured in the same run:

    * MESH: the client connects to <router node IP>:8081, as an Edge component would; n1's nat
      chain sends it to n1's egress sidecar upstream (<its role's loopback address>:<proxy
      port>, from the planner), which opens mTLS to n2's ``rt-8081-<ip>`` ingress sidecar,
      which hands plaintext to the stand-in component (lab/standin.py) on 127.0.0.1:8081.
    * DIRECT: the same stand-in program (the node's installed /usr/local/bin/apigee-standin,
      checked identical to lab/standin.py), started by this script inside n2 bound to
      <n2 IP>:18081 (``--direct-port``: no proxy range, no component port, so neither the nat
      redirect nor the firewall knows it), reached from n1 in plaintext. Same server code, same
      client code, same payloads: the difference is the mesh.

    The stand-in answers every line with a JSON line that echoes it, so "throughput" is echo
    throughput: every payload byte crosses the path twice (request, then the echoed reply);
    MB/s (10^6 bytes) counts the payload one way. The server is single-threaded Python, so the
    direct figure is the server's ceiling, not the network's; on 2 shared cores the proxies
    compete with client and server for CPU, which is part of what the ratio shows.
    Metrics (client: bench/dataplane_client.py, run inside n1 by the node's python3):

    * throughput: one connection, 32 KiB lines for 3 s, x3 per path, median;
    * round trip: 2,000 sequential round trips of a 64-byte line on one connection (after 100
      warm-up ones), p50/p99, x3 per path, median of each percentile;
    * connect: 300 x (new connection + one 64-byte round trip + close), p50/p99, x3, median;
      through the mesh each one includes a new mTLS connection between the sidecars;
    * parallel: 16 connections (asyncio, one process) doing round trips for 3 s, total round
      trips/s, x3, median;
    * proxy CPU: utime+stime (/proc/<pid>/stat, host PIDs found with pgrep on
      ``-sidecar-for egress-<role>-<n1>`` and ``-sidecar-for rt-8081-<n2>``) before/after each MESH
      throughput run, summed over the runs, divided by the bytes both ways through the proxy
      (GiB = 2^30). The servers' CPU per GiB is shown for both paths as a control.

    The servers this script starts are killed by PID at the end (and run under ``timeout`` in
    the node as a safety net). Refused while the lab is in use (a pytest session or a tcpdump
    on the lab bridge is running): the direct path is plaintext between nodes, which the lab's
    capture test would rightly flag. ``--force`` overrides.

rollout (only with ``--only rollout``: it destroys and re-creates the lab)
    ``--repeat`` times: ``labctl down``, then cold ``labctl up --no-apply`` (boot, minions,
    sync_all), the first ``state.apply apigee_mtls`` (timed), until every sidecar passes
    (``Lab.wait_mesh_ready`` from tests/lab/conftest.py), then an idempotent rerun (time and
    changed states, which should be 0); then, unless ``--no-add-node``, adds a node (the next
    id and IP, message-processor + router): its machine boots (timed apart: provisioning), then
    from the pillar edit to its flows working: targeted ``state.highstate`` on it, the peers'
    ``salt '*' state.apply apigee_mtls``, every node's ``apigee_mtls.verify`` passing (which
    probes every upstream through the mesh). Medians of the complete runs, one JSON entry per
    topology ("rollout 5-node", "rollout 13-node"). The lab is left up with the extra node.
"""
import argparse
import copy
import datetime
import gc
import importlib.util
import json
import os
import re
import resource
import select
import signal
import statistics
import subprocess
import sys
import time
import tracemalloc

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
RESULTS = os.path.join(BENCH, "results.json")
LABCTL = os.path.join(REPO, "lab", "labctl.py")
TOPOLOGIES = os.path.join(REPO, "tests", "topologies")

sys.path.insert(0, os.path.join(REPO, "_utils"))
import apigee_mtls_plan as planner  # noqa: E402  (pure planner, no Salt)

SECTIONS = ("planner", "dataplane", "native", "zookeeper", "rollout")
#: sections in modules of their own: name -> module (``section_<name>``, ``print_<name>``)
MODULE_SECTIONS = {"native": "native", "zookeeper": "zookeeper"}
MiB = 1 << 20
GiB = 1 << 30


# ---------------------------------------------------------------------------------------------
# small helpers
def say(msg):
    print(msg, flush=True)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, spec=".1f", none="-"):
    return none if value is None else format(value, spec)


def table(headers, rows, aligns=None):
    """Plain-text table; ``rows`` are lists of already formatted strings."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    aligns = aligns or ["<"] + [">"] * (len(headers) - 1)
    def line(cells):
        return "  ".join(f"{str(c):{a}{w}}" for c, a, w in zip(cells, aligns, widths))

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def loadavg():
    with open("/proc/loadavg", encoding="utf-8") as fh:
        return [float(x) for x in fh.read().split()[:3]]


def git_rev():
    def git(*args):
        return subprocess.run(["git", "-C", REPO] + list(args), capture_output=True, text=True,
                              check=False).stdout.strip()
    rev = git("rev-parse", "--short", "HEAD")
    return rev + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def section_meta():
    return {"when": datetime.datetime.now().isoformat(timespec="seconds"), "commit": git_rev(),
            "python": sys.version.split()[0], "cpus": os.cpu_count(), "loadavg_before": loadavg()}


def node_run(labctl, node, argv, timeout=120, check=True):
    """Run ``argv`` in a lab node (``labctl.node_exec_cmd``); the finished process.

    :raises RuntimeError: with ``check``, when it exits non-zero (its stderr's end)"""
    proc = subprocess.run(labctl.node_exec_cmd(node, argv), capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{node}: {' '.join(argv)}: rc {proc.returncode}: "
                           f"{proc.stderr[-600:]}")
    return proc


def lab_for(section, args):
    """``(labctl, None)`` when the lab runs and is idle (or ``args.force``), else ``(None, why
    the section is skipped)``."""
    running, msg = lab_running()
    if not running:
        return None, f"{section}: skipped, the lab is not running ({msg.splitlines()[0]})"
    labctl = load_module("labctl", LABCTL)
    users = lab_users(labctl.BRIDGE)
    if users and not args.force:
        return None, "{}: skipped, the lab is in use ({})".format(
            section, "; ".join(f"pid {p}: {c}" for p, c in users))
    return labctl, None


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------------
# planner
def synthetic_ip(i):
    """Unique unicast IPs 10.100.1.1, 10.100.1.2, ... (no .0 / .255 host bytes)."""
    return "10.{}.{}.{}".format(100 + i // (254 * 254), (i // 254) % 254 + 1, i % 254 + 1)


def forbidden_ports():
    """Ports no proxy range may contain (stricter than the planner: all of 8300-8600)."""
    meshed = {p for spec in planner.COMPONENTS.values() for p in spec["ports"]}
    return (set(planner.APIGEE_SERVICE_PORTS) | set(range(8300, 8601)) | meshed
            | set(planner.DEFAULT_PROTECTED_PORTS) | set(planner.CONSUL_PORTS))


def fitted_port_ranges(nodes, start=10800):
    """Disjoint ranges, consecutive from ``start``, each exactly as large as the allocation
    needs (ports per node x nodes hosting the component; egress: one per node), moved past any
    forbidden port."""
    low_eph, high_eph = planner.EPHEMERAL_PORTS
    forbidden = forbidden_ports() | set(range(low_eph, high_eph + 1))
    names = [c for c, spec in planner.COMPONENTS.items() if spec["ports"]] + ["egress"]
    ranges, port = {}, start
    for name in names:
        if name == "egress":
            size = len(nodes)
        else:
            size = len(planner.COMPONENTS[name]["ports"]) * sum(
                name in n["components"] for n in nodes)
        size = max(size, 1)
        low = port
        while True:
            hit = [p for p in forbidden if low <= p < low + size]
            if not hit:
                break
            low = max(hit) + 1
        if low + size - 1 > 65535:
            raise SystemExit(f"bench: {len(nodes)} nodes need more proxy ports than exist "
                             f"({name} would end at {low + size - 1})")
        ranges[name] = [low, low + size - 1]
        port = low + size
    return ranges


def synthetic_pillar(size, template):
    """``size`` nodes repeating ``template``'s node list (roles), with fitted port ranges."""
    roles = [list(n["components"]) for n in template["nodes"]]
    nodes = [{"id": f"n{i + 1}", "ip": synthetic_ip(i), "components": list(roles[i % len(roles)])}
             for i in range(size)]
    pillar = copy.deepcopy({k: v for k, v in template.items() if k != "nodes"})
    pillar["nodes"] = nodes
    pillar["port_ranges"] = fitted_port_ranges(nodes)
    return pillar


def role_samples(pillar):
    """{role: {"node": first node id with that component set, "count": nodes}}."""
    roles = {}
    for node in pillar["nodes"]:
        role = "+".join(node["components"])
        entry = roles.setdefault(role, {"node": node["id"], "count": 0})
        entry["count"] += 1
    return roles


def predicted_upstreams(model):
    """Number of (role identity -> ingress service) allows, i.e. intentions minus the
    deny-all, counted without materialising them (uses the planner's internal _Index; None
    when that internal changed). A role's allows are the union of its nodes' upstreams: every
    instance of a destination it reaches, but its own when the role has one node."""
    try:
        index = planner._Index(model)
        roles = {}
        for node in model["nodes"]:
            if not node["retired"]:
                roles.setdefault(frozenset(node["components"]), []).append(node)
        total = 0
        for components, members in roles.items():
            for dest, ports in index.reach(sorted(components)).items():
                others = len(index.hosts[dest]) - (
                    1 if dest in components and len(members) == 1 else 0)
                total += others * len(ports)
        return total
    except Exception:  # private API: never let the bench die on it
        return None


def timed(fn, repeats, cpu_log=None):
    """Median wall time (s) of ``fn()``: ``repeats`` runs when one takes under 2 s, 3 runs
    under 10 s, else a single run. Returns (median, runs, result of the last run). The
    previous result is dropped before each run so big outputs never coexist. ``cpu_log``, a
    list, receives (wall, cpu) medians: process CPU time barely moves when other processes
    steal the cores, so wall/CPU shows how busy the host was."""
    walls, cpus, result = [], [], None
    planned = max(1, repeats)
    while len(walls) < planned:
        result = None
        gc.collect()
        c, t = time.process_time(), time.perf_counter()
        result = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        if len(walls) == 1:
            planned = planned if walls[0] < 2 else min(planned, 3) if walls[0] < 10 else 1
    if cpu_log is not None:
        cpu_log.append((statistics.median(walls), statistics.median(cpus)))
    return statistics.median(walls), len(walls), result


def traced_peak(fn):
    """Peak bytes allocated while ``fn()`` runs (tracemalloc), its result discarded."""
    gc.collect()
    tracemalloc.start()
    try:
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    gc.collect()
    return peak


def bench_planner_size(size, template, args):
    pillar = synthetic_pillar(size, template)
    out = {"nodes": size, "port_ranges": pillar["port_ranges"]}
    reps = args.planner_repeats
    clock = []  # (wall, cpu) of every timed stage

    t, runs, model = timed(lambda: planner.normalize(pillar), reps, cpu_log=clock)
    out["normalize_ms"] = t * 1e3
    out["normalize_cpu_ms"] = clock[-1][1] * 1e3
    predicted = predicted_upstreams(model)
    out["predicted_intentions"] = None if predicted is None else predicted + 1
    del model

    roles = role_samples(pillar)
    per_role = {}
    for role, info in roles.items():
        t, _, p = timed(lambda: planner.plan(pillar, info["node"]), reps, cpu_log=clock)
        per_role[role] = {"node": info["node"], "count": info["count"], "plan_ms": t * 1e3,
                          "plan_cpu_ms": clock[-1][1] * 1e3,
                          "upstreams": len(p["upstreams"]), "services": len(p["services"])}
    out["plan_per_role"] = per_role
    # heaviest/lightest by work (upstream count), not by a noisy timing
    heavy = max(per_role, key=lambda r: (per_role[r]["upstreams"], per_role[r]["plan_ms"]))
    light = min(per_role, key=lambda r: (per_role[r]["upstreams"], per_role[r]["plan_ms"]))
    out["plan_one_heaviest"] = {"role": heavy, **per_role[heavy]}
    out["plan_one_lightest"] = {"role": light, **per_role[light]}

    estimate = sum(r["count"] * r["plan_ms"] for r in per_role.values()) / 1e3
    out["plan_all_estimate_s"] = estimate
    if estimate <= args.plan_budget:
        gc.collect()
        c0, t0 = time.process_time(), time.perf_counter()
        for node in pillar["nodes"]:
            planner.plan(pillar, node["id"])
        out["plan_all_s"] = time.perf_counter() - t0
        clock.append((out["plan_all_s"], time.process_time() - c0))
        out["plan_all_method"] = "measured (once)"
    else:
        out["plan_all_s"] = estimate
        out["plan_all_method"] = (f"extrapolated from the per-role medians (estimate "
                                  f"{estimate:.0f}s > --plan-budget {args.plan_budget:g}s)")

    limit = args.max_intentions
    heavy_ok = limit == 0 or (predicted is not None and predicted + 1 <= limit)
    if heavy_ok:
        t, runs, result = timed(lambda: planner.intentions(pillar), reps, cpu_log=clock)
        out.update({"intentions": len(result), "intentions_ms": t * 1e3,
                    "intentions_runs": runs})
        if predicted is not None and predicted + 1 != len(result):
            say(f"  ! predicted {predicted + 1} intentions, got {len(result)}")
        del result
        t, runs, result = timed(lambda: planner.port_report(pillar), reps, cpu_log=clock)
        out.update({"port_report_ms": t * 1e3, "port_report_runs": runs})
        del result
    else:
        out["intentions"] = out["predicted_intentions"]
        out["skipped"] = (f"intentions/port_report not run: {out['predicted_intentions']:,} "
                          f"intentions predicted > --max-intentions {limit:,} "
                          f"(0 = no limit)")

    out["wall_over_cpu"] = sum(w for w, _ in clock) / max(1e-9, sum(c for _, c in clock))
    heavy_node = per_role[heavy]["node"]
    peaks = {"normalize": traced_peak(lambda: planner.normalize(pillar)),
             "plan_heaviest": traced_peak(lambda: planner.plan(pillar, heavy_node))}
    if heavy_ok:
        peaks["intentions"] = traced_peak(lambda: planner.intentions(pillar))
        peaks["port_report"] = traced_peak(lambda: planner.port_report(pillar))
    out["peak_mib"] = {k: v / MiB for k, v in peaks.items()}
    out["peak_mib_max"] = max(peaks.values()) / MiB
    return out


def section_planner(args):
    with open(os.path.join(TOPOLOGIES, "13-node.yaml"), encoding="utf-8") as fh:
        template = yaml.safe_load(fh)
    template = template.get("apigee_mtls", template)
    result = {"meta": section_meta(), "template": "tests/topologies/13-node.yaml",
              "sizes": {}}
    for size in args.sizes:
        say(f"planner: {size} nodes ...")
        t = time.monotonic()
        result["sizes"][str(size)] = bench_planner_size(size, template, args)
        say(f"planner: {size} nodes done in {time.monotonic() - t:.0f}s")
    result["meta"]["loadavg_after"] = loadavg()
    result["meta"]["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def print_planner(res):
    rows = []
    for size, r in res["sizes"].items():
        w, b = r["plan_one_heaviest"], r["plan_one_lightest"]
        approx = "" if r["plan_all_method"].startswith("measured") else "~"
        rows.append([
            f"{int(size):,}",
            fmt(r["normalize_ms"]),
            f"{w['plan_ms']:.1f} / {b['plan_ms']:.1f}",
            f"{w['upstreams']:,}",
            approx + fmt(r["plan_all_s"], ".2f"),
            f"{r['intentions']:,}" + ("*" if "skipped" in r else ""),
            fmt(r.get("intentions_ms"), ".0f", "skipped*"),
            fmt(r.get("port_report_ms"), ".0f", "skipped*"),
            fmt(r["peak_mib_max"], ".1f") + ("*" if "skipped" in r else ""),
        ])
    say("\nPLANNER (pure; synthetic pillars repeating the 13-node roles; medians)")
    say(table(["nodes", "validate+alloc ms", "1 node plan ms (heavy/light role)",
               "heavy upstreams", "all nodes' plans s", "intentions", "intentions ms",
               "port_report ms", "peak MiB"], rows))
    notes = []
    for size, r in res["sizes"].items():
        if not r["plan_all_method"].startswith("measured"):
            notes.append(f"~ {int(size):,} nodes: all nodes' plans {r['plan_all_method']}")
        if "skipped" in r:
            notes.append(f"* {int(size):,} nodes: {r['skipped']}; intentions count is the "
                         f"prediction, peak MiB excludes intentions/port_report")
    roles = res["sizes"][next(iter(res["sizes"]))]
    notes.append(f"1 node plan = plan(pillar, id) as a minion calls it (normalize included); "
                 f"heaviest role {roles['plan_one_heaviest']['role']}, lightest "
                 f"{roles['plan_one_lightest']['role']} (by upstream count)")
    notes.append("all nodes' plans = sum of plan() over every node (the whole cluster's CPU)")
    busy = ", ".join(f"{int(k):,}: {r['wall_over_cpu']:.2f}" for k, r in res["sizes"].items())
    notes.append(f"wall/CPU time of the timed stages (1.00 = the host was idle): {busy}")
    r1000 = res["sizes"].get("1000")
    if r1000:
        ms = r1000["plan_one_heaviest"]["plan_ms"]
        notes.append(f"target: plan() for one node of a 1,000-node pillar under 2 s: "
                     f"{ms:.0f} ms (heaviest role) -> {'met' if ms < 2000 else 'NOT met'}")
    for n in notes:
        say("  " + n)


# ---------------------------------------------------------------------------------------------
# lab helpers (dataplane, rollout)
def lab_running():
    """(running, message) from ``labctl status`` (never boots anything)."""
    proc = subprocess.run([sys.executable, LABCTL, "status"], capture_output=True, text=True,
                          check=False, timeout=60)
    text = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        return False, text or f"labctl status exited {proc.returncode}"
    down = [row.split()[0] for row in text.splitlines() if re.search(r"\sdown\s", row)]
    if down:
        return False, f"nodes down: {', '.join(down)}\n{text}"
    return True, text


def lab_users(bridge):
    """Processes using the lab right now: pytest sessions, captures on the bridge, labctl
    up/down/apply runs, salt state.apply runs (host-wide /proc scan; our own process
    excluded)."""
    users = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
        except OSError:
            continue
        if not argv:
            continue
        joined = " ".join(argv)
        head = " ".join(argv[:3])
        if "pytest" in head and "bench/run.py" not in joined:
            users.append((int(entry), joined[:120]))
        elif os.path.basename(argv[0]) == "tcpdump" and bridge in argv:
            users.append((int(entry), joined[:120]))
        elif any(a.endswith("labctl.py") for a in argv[:3]) and any(
                c in argv for c in ("up", "down", "apply")):
            users.append((int(entry), joined[:120]))
        elif "state.apply" in argv:  # a salt CLI run against the lab (labctl salt ...)
            users.append((int(entry), joined[:120]))
    return users


def proc_cpu_seconds(pid):
    """utime+stime of a process (host PID), seconds."""
    with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
        data = fh.read()
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                    data = fh.read()
            except OSError:
                continue
            if int(data[data.rindex(")") + 2:].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def pid_ns(pid):
    return os.readlink(f"/proc/{pid}/ns/pid")


def find_pids(pattern):
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True,
                         check=False).stdout
    return [int(p) for p in out.split()]


# ---------------------------------------------------------------------------------------------
# dataplane
class LabBusy(RuntimeError):
    """Someone started using the lab while the dataplane section was measuring."""


class NodeServer:
    """The stand-in program, started by us inside a node with our own one-listener config;
    stopped by PID."""

    CONFIG = "/tmp/amtls-bench-standin.json"

    def __init__(self, labctl, node, ip, port, ttl=900):
        self.labctl, self.node, self.ip, self.port = labctl, node, ip, port
        cfg = {"node": node, "ip": ip,
               "listeners": [{"component": "router", "port": port, "bind": ip}]}
        script = (f"cat > {self.CONFIG} && exec timeout {ttl} "
                  f"python3 /usr/local/bin/apigee-standin {self.CONFIG}")
        self.proc = subprocess.Popen(labctl.node_exec_cmd(node, ["sh", "-c", script]),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.proc.stdin.write(json.dumps(cfg).encode())
        self.proc.stdin.close()
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        line = self.proc.stdout.readline().decode() if ready else ""
        if "listeners" not in line:
            self.stop()
            err = self.proc.stderr.read().decode(errors="replace")[-800:]
            raise RuntimeError(f"bench server on {node} {ip}:{port} did not start: {line}{err}")
        self.python_pid = self._python_pid()

    def _python_pid(self):
        """Host PID of the server's python (nsenter -> timeout -> python3)."""
        for _ in range(50):
            for kid in children(self.proc.pid):
                for grandkid in children(kid):
                    return grandkid
            time.sleep(0.1)
        return None

    def stop(self):
        if self.proc.poll() is None:
            for pid in children(self.proc.pid):  # `timeout`, which passes SIGTERM on
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                for pid in [getattr(self, "python_pid", None)] + children(self.proc.pid):
                    if pid:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except OSError:
                            pass
                self.proc.kill()
                self.proc.wait(timeout=10)
        subprocess.run(self.labctl.node_exec_cmd(self.node, ["rm", "-f", self.CONFIG]),
                       capture_output=True, check=False, timeout=30)


def node_file_text(labctl, node, path):
    proc = subprocess.run(labctl.node_exec_cmd(node, ["cat", path]), capture_output=True,
                          text=True, check=False, timeout=30)
    return proc.stdout if proc.returncode == 0 else None


def standin_host_pid(labctl, node):
    """Host PID of the node's apigee-standin service (python3 /usr/local/bin/apigee-standin)."""
    ns = pid_ns(labctl.init_pid(node))
    for pid in find_pids(r"python3 /usr/local/bin/apigee-standin$"):
        try:
            if pid_ns(pid) == ns:
                return pid
        except OSError:
            continue
    return None


def run_client(labctl, node, client_src, **args):
    """Run bench/dataplane_client.py inside ``node`` with ``args``; returns its JSON."""
    budget = float(args.get("max_seconds", 60)) + 60
    proc = subprocess.run(labctl.node_exec_cmd(node, ["python3", "-", json.dumps(args)]),
                          input=client_src, capture_output=True, text=True, check=False,
                          timeout=budget)
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"client on {node}: no JSON: {proc.stdout[-400:]} "
                           f"{proc.stderr[-800:]}")
    if "error" in out:
        raise RuntimeError(f"client on {node} ({args['mode']} {args['host']}:{args['port']}): "
                           f"{out['error']}")
    return out


def section_dataplane(args):
    running, msg = lab_running()
    if not running:
        return None, f"dataplane: skipped, the lab is not running ({msg.splitlines()[0]}); " \
                     f"start it with `make lab` (this benchmark never boots one)"
    labctl = load_module("labctl", LABCTL)
    users = lab_users(labctl.BRIDGE)
    if users and not args.force:
        listing = "; ".join(f"pid {p}: {c}" for p, c in users)
        return None, (f"dataplane: skipped, the lab is in use ({listing}); the direct path "
                      f"sends plaintext between nodes, which a capture test would flag. "
                      f"Rerun when it is idle, or with --force")
    state = labctl.load_state()
    topo_path = state["topology"]
    pillar = labctl.load_topology(topo_path)
    model = planner.normalize(pillar)
    live = [n for n in model["nodes"] if not n["retired"]]
    src = next((n for n in live if "management-server" in n["components"]), None)
    dst = next((n for n in live if "router" in n["components"] and n is not src), None)
    if src is None or dst is None:
        return None, (f"dataplane: skipped, the lab's topology ({topo_path}) has no "
                      f"management-server and router on two different nodes")
    port = 8081
    service = planner.service_name("router", port, dst["ip"])
    # the instance (its sidecar's -sidecar-for) and the identity (its leaf certificate)
    egress_plan = planner.plan(pillar, src["id"])["egress"]
    egress, identity = egress_plan["id"], egress_plan["identity"]
    upstream = next((u for u in planner.plan(pillar, src["id"])["upstreams"]
                     if u["service"] == service), None)
    if upstream is None:
        return None, f"dataplane: skipped, the planner gives {src['id']} no upstream {service}"
    direct_port = args.direct_port
    busy_ports = forbidden_ports() | set(range(10001, 10800))
    for low, high in model["port_ranges"].values():
        busy_ports |= set(range(low, high + 1))
    if direct_port in busy_ports:
        return None, f"dataplane: --direct-port {direct_port} is a proxy/component/service port"

    proxy_pids = {}
    for label, svc in (("egress", egress), ("ingress", service)):
        # service names are [a-z0-9-] only: safe in a pgrep (ERE) pattern as they are
        pids = find_pids(rf"consul connect proxy -sidecar-for {svc}( |$)")
        if len(pids) != 1:
            return None, f"dataplane: expected one sidecar process for {svc}, found {pids}"
        proxy_pids[label] = pids[0]

    with open(os.path.join(BENCH, "dataplane_client.py"), encoding="utf-8") as fh:
        client_src = fh.read()
    with open(os.path.join(REPO, "lab", "standin.py"), encoding="utf-8") as fh:
        identical = node_file_text(labctl, dst["id"], "/usr/local/bin/apigee-standin") == fh.read()

    result = {"meta": section_meta(), "topology": os.path.relpath(topo_path, REPO),
              "client": src["id"], "server": dst["id"], "component_port": port,
              "mesh": {"target": f"{dst['ip']}:{port}", "service": service,
                       "egress_service": egress,
                       "upstream": f"{upstream['local_bind_address']}:{upstream['proxy_port']}",
                       "proxy_pids": proxy_pids},
              "direct": {"target": f"{dst['ip']}:{direct_port}"},
              "server_code_identical_to_lab_standin": identical,
              "settings": {"repeats": args.dp_repeats, "line_bytes": args.line_bytes,
                           "seconds": args.dp_seconds, "rtt_count": args.rtt_count,
                           "connect_count": args.connect_count, "parallel": args.parallel}}
    targets = {"direct": (dst["ip"], direct_port), "mesh": (dst["ip"], port)}
    say(f"dataplane: {src['id']} -> {dst['id']}: MESH {dst['ip']}:{port} "
        f"(via {upstream['local_bind_address']}:{upstream['proxy_port']}, {egress} -> "
        f"{service}) vs DIRECT "
        f"{dst['ip']}:{direct_port} (same stand-in code: {identical})")

    server = NodeServer(labctl, dst["id"], dst["ip"], direct_port)
    server_pids = {"direct": server.python_pid, "mesh": standin_host_pid(labctl, dst["id"])}
    try:
        for path, (host, tport) in targets.items():
            reply = run_client(labctl, src["id"], client_src, mode="probe", host=host,
                               port=tport)["reply"]
            result[path]["probe_reply"] = reply
            want_peer = "127.0.0.1:" if path == "mesh" else src["ip"] + ":"
            if reply.get("node") != dst["id"] or not str(reply.get("peer")).startswith(want_peer):
                raise RuntimeError(f"{path} probe reached the wrong place: {reply}")

        runs = {p: {"throughput": [], "rtt": [], "connect": [], "parallel": []} for p in targets}
        cpu = {"proxy": {k: 0.0 for k in proxy_pids}, "proxy_bytes": 0,
               "proxy_during_direct": {k: 0.0 for k in proxy_pids},
               "server": {p: 0.0 for p in targets}, "server_bytes": {p: 0 for p in targets}}
        metrics = [
            ("throughput", dict(mode="throughput", seconds=args.dp_seconds,
                                line_bytes=args.line_bytes, max_seconds=args.dp_seconds + 30)),
            ("rtt", dict(mode="rtt", count=args.rtt_count, warmup=100, size=64,
                         max_seconds=60)),
            ("connect", dict(mode="connect", count=args.connect_count, size=64,
                             max_seconds=60)),
            ("parallel", dict(mode="parallel", connections=args.parallel,
                              seconds=args.dp_seconds, size=64, max_seconds=args.dp_seconds + 30)),
        ]
        for name, margs in metrics:
            for rep in range(args.dp_repeats):
                order = ["direct", "mesh"] if rep % 2 == 0 else ["mesh", "direct"]
                for path in order:
                    users = [] if args.force else lab_users(labctl.BRIDGE)
                    if users:
                        raise LabBusy("; ".join(f"pid {p}: {c}" for p, c in users))
                    host, tport = targets[path]
                    spid = server_pids[path]
                    before = {k: proc_cpu_seconds(p) for k, p in proxy_pids.items()}
                    sbefore = proc_cpu_seconds(spid) if spid else None
                    out = run_client(labctl, src["id"], client_src, host=host, port=tport,
                                     **margs)
                    after = {k: proc_cpu_seconds(p) for k, p in proxy_pids.items()}
                    runs[path][name].append(out)
                    if name == "throughput":
                        both_ways = out["sent_bytes"] + out["recv_bytes"]
                        if spid:
                            cpu["server"][path] += proc_cpu_seconds(spid) - sbefore
                            cpu["server_bytes"][path] += both_ways
                        if path == "mesh":
                            for k in proxy_pids:
                                cpu["proxy"][k] += after[k] - before[k]
                            cpu["proxy_bytes"] += both_ways
                        else:  # control: the direct path must leave the sidecars idle
                            for k in proxy_pids:
                                cpu["proxy_during_direct"][k] += after[k] - before[k]
                    say(f"  {name:10} {path:6} #{rep + 1}: {summary_of(name, out)}")
    finally:
        server.stop()

    # where a new mesh connection's time goes: each per-connection step of the built-in proxy
    # timed alone (bench/connect_profile.py), next to the measured new-connection figure
    with open(os.path.join(BENCH, "connect_profile.py"), encoding="utf-8") as fh:
        prof_src = fh.read()
    ingress = (dst["ip"], upstream["proxy_port"])
    dc = dst.get("datacenter") or model["datacenters"][0]
    steps = [
        ("resolve", src["id"], dict(mode="resolve", service=service)),
        ("tcp", src["id"], dict(mode="tcp", host=ingress[0], port=ingress[1])),
        ("handshake", src["id"], dict(mode="handshake", host=ingress[0], port=ingress[1],
                                      client_service=identity)),
        ("authorize", dst["id"], dict(mode="authorize", service=service, dc=dc,
                                      client_service=identity)),
    ]
    profile = {}
    for name, node, pargs in steps:
        pargs.update(count=args.connect_count, host=pargs.get("host", ""),
                     port=pargs.get("port", 0))
        outs = [run_client(labctl, node, prof_src, **pargs) for _ in range(args.dp_repeats)]
        profile[name] = {"node": node,
                         "p50_us": median(o["p50_us"] for o in outs),
                         "p99_us": median(o["p99_us"] for o in outs),
                         **{k: outs[0][k] for k in ("tls_version", "cipher") if k in outs[0]}}
        say(f"  profile {name:9} on {node}: p50 {profile[name]['p50_us']:.0f}us "
            f"p99 {profile[name]['p99_us']:.0f}us")
    result["connect_profile"] = profile

    summary = {}
    for path in targets:
        r = runs[path]
        summary[path] = {
            "throughput_mb_s": median(x["mb_per_s"] for x in r["throughput"]),
            "rtt_p50_us": median(x["p50_us"] for x in r["rtt"]),
            "rtt_p99_us": median(x["p99_us"] for x in r["rtt"]),
            "connect_p50_us": median(x["p50_us"] for x in r["connect"]),
            "connect_p99_us": median(x["p99_us"] for x in r["connect"]),
            "connect_errors": sum(x["errors"] for x in r["connect"]),
            "parallel_rps": median(x["rps"] for x in r["parallel"]),
            "parallel_p50_us": median(x["p50_us"] for x in r["parallel"]),
            "parallel_p99_us": median(x["p99_us"] for x in r["parallel"]),
            "server_cpu_s_per_gib": (cpu["server"][path] / (cpu["server_bytes"][path] / GiB)
                                     if cpu["server_bytes"][path] else None),
        }
    gib = cpu["proxy_bytes"] / GiB
    summary["mesh"]["proxy_cpu_s_per_gib"] = {k: (v / gib if gib else None)
                                              for k, v in cpu["proxy"].items()}
    summary["mesh"]["proxy_cpu_s_per_gib"]["total"] = (sum(cpu["proxy"].values()) / gib
                                                       if gib else None)
    summary["ratio_mesh_over_direct"] = {
        k: (summary["mesh"][k] / summary["direct"][k]
            if summary["mesh"][k] and summary["direct"][k] else None)
        for k in ("throughput_mb_s", "rtt_p50_us", "rtt_p99_us", "connect_p50_us",
                  "connect_p99_us", "parallel_rps", "parallel_p50_us", "parallel_p99_us")}
    result["summary"] = summary
    result["runs"] = runs
    result["cpu"] = cpu
    result["meta"]["loadavg_after"] = loadavg()
    return result, None


def summary_of(name, out):
    if name == "throughput":
        return (f"{out['mb_per_s']:.1f} MB/s ({out['sent_bytes'] / 1e6:.0f} MB in "
                f"{out['elapsed_s']:.2f}s)")
    if name == "parallel":
        return f"{out['rps']:.0f} rt/s, p50 {out['p50_us']:.0f}us p99 {out['p99_us']:.0f}us"
    extra = f", {out['errors']} errors" if out.get("errors") else ""
    return f"p50 {out['p50_us']:.0f}us p99 {out['p99_us']:.0f}us (n={out['n']}{extra})"


def print_dataplane(res):
    s = res["summary"]
    d, m, ratio = s["direct"], s["mesh"], s["ratio_mesh_over_direct"]
    st = res["settings"]

    def row(label, key, spec=".0f", scale=1.0):
        dv, mv = d.get(key), m.get(key)
        return [label, fmt(None if dv is None else dv * scale, spec),
                fmt(None if mv is None else mv * scale, spec), fmt(ratio.get(key), ".2f")]

    rows = [
        row(f"echo throughput MB/s (1 conn, {st['line_bytes'] // 1024} KiB lines)",
            "throughput_mb_s", ".1f"),
        row("round trip p50 us (64 B, 1 conn)", "rtt_p50_us"),
        row("round trip p99 us", "rtt_p99_us"),
        row("new conn + 1st round trip p50 ms", "connect_p50_us", ".2f", 1e-3),
        row("new conn + 1st round trip p99 ms", "connect_p99_us", ".2f", 1e-3),
        row(f"{st['parallel']} conns: round trips/s", "parallel_rps"),
        row(f"{st['parallel']} conns: round trip p50 us", "parallel_p50_us"),
        row(f"{st['parallel']} conns: round trip p99 us", "parallel_p99_us"),
        row("server CPU s/GiB (both ways)", "server_cpu_s_per_gib", ".2f"),
    ]
    pc = m["proxy_cpu_s_per_gib"]
    rows.append([f"proxy CPU s/GiB: {res['client']} egress", "-", fmt(pc["egress"], ".2f"), ""])
    rows.append([f"proxy CPU s/GiB: {res['server']} rt-8081 ingress", "-",
                 fmt(pc["ingress"], ".2f"), ""])
    rows.append(["proxy CPU s/GiB: both sidecars", "-", fmt(pc["total"], ".2f"), ""])
    say(f"\nDATAPLANE ({res['client']} -> {res['server']}, medians of {st['repeats']} "
        f"interleaved runs per path; topology {res['topology']})")
    say(table(["metric", "direct", "mesh", "mesh/direct"], rows, ["<", ">", ">", ">"]))
    say(f"  DIRECT = {res['direct']['target']} plaintext; MESH = {res['mesh']['target']} "
        f"-> nat -> {res['mesh']['upstream']} ({res['mesh']['egress_service']}) -> mTLS -> "
        f"{res['mesh']['service']} -> 127.0.0.1:{res['component_port']}")
    idle = res["cpu"]["proxy_during_direct"]
    say("  control: sidecar CPU during the direct throughput runs: "
        + ", ".join(f"{k} {v:.2f}s" for k, v in idle.items()))
    say("  both servers: the lab stand-in (one JSON reply echoing each line); throughput is echo "
        "throughput, payload one way; GiB for CPU counts bytes both ways; servers are "
        "single-threaded Python on 2 shared cores, so absolute numbers are the lab's, not "
        "Consul's")
    prof = res.get("connect_profile")
    if prof:
        conn = d.get("connect_p50_us"), m.get("connect_p50_us")
        rows = [["mesh new conn + 1st round trip (measured above)", fmt(conn[1], ".0f")],
                ["direct new conn + 1st round trip (measured above)", fmt(conn[0], ".0f")],
                [f"1. resolve: GET /v1/health/connect (on {prof['resolve']['node']})",
                 fmt(prof["resolve"]["p50_us"], ".0f")],
                ["2. TCP connect to the destination sidecar", fmt(prof["tcp"]["p50_us"], ".0f")],
                [f"3. mTLS handshake incl. 4 ({prof['handshake'].get('tls_version')}, "
                 f"Python ssl)", fmt(prof["handshake"]["p50_us"], ".0f")],
                [f"4. authorize: POST /v1/agent/connect/authorize (on "
                 f"{prof['authorize']['node']})", fmt(prof["authorize"]["p50_us"], ".0f")]]
        say("\nNEW CONNECTION PROFILE: the built-in proxy's per-connection steps, each timed "
            "alone (p50 us)")
        say(table(["step", "p50 us"], rows, ["<", ">"]))
    if not res["server_code_identical_to_lab_standin"]:
        say("  ! the node's /usr/local/bin/apigee-standin differs from lab/standin.py")


# ---------------------------------------------------------------------------------------------
# rollout
def topology_path(name):
    if os.path.exists(name):
        return os.path.abspath(name)
    path = os.path.join(TOPOLOGIES, name if name.endswith(".yaml") else name + ".yaml")
    if not os.path.exists(path):
        raise SystemExit(f"bench: no topology {name!r} (try 5-node or 13-node, or a file)")
    return path


class MasterWatch:
    """What the lab's salt-master spends while a step runs: its requests per command (the
    ``salt/stats/<worker>`` events that ``master_stats: True`` makes each worker fire every
    ``master_stats_event_iter`` s, read from the master's event bus), the CPU seconds of its
    process tree (psutil, children that exited included) and the peak of their summed PSS
    (sampled every 0.5 s). Requests a worker handled in its last interval are only counted
    once it fires again, so ``stop()`` waits ``master_stats_event_iter`` + 1 s and pings every
    minion twice, then subtracts what those pings cost (two ``_return`` per node)."""

    def __init__(self, labctl):
        import threading  # pylint: disable=import-outside-toplevel

        import psutil  # pylint: disable=import-outside-toplevel
        import salt.config  # pylint: disable=import-outside-toplevel
        import salt.utils.event  # pylint: disable=import-outside-toplevel

        path = os.path.join(labctl.SALT_CONF, "master")
        self.opts = salt.config.master_config(path)
        with open(path, encoding="utf-8") as fh:
            self.raw = yaml.safe_load(fh) or {}
        with open(os.path.join(labctl.STATE, "master", "salt-master.pid"),
                  encoding="utf-8") as fh:
            self.master = psutil.Process(int(fh.read().strip()))
        self.psutil = psutil
        self.requests = {}
        self.peak_pss = 0
        self.done = threading.Event()
        self.event = salt.utils.event.get_master_event(self.opts, self.opts["sock_dir"],
                                                       listen=True)
        self.cpu0 = self._cpu()
        self.threads = [threading.Thread(target=self._stats, daemon=True),
                        threading.Thread(target=self._memory, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _tree(self):
        procs = [self.master]
        try:
            procs += self.master.children(recursive=True)
        except self.psutil.Error:
            pass
        return procs

    def _cpu(self):
        total = 0.0
        for proc in self._tree():
            try:
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except self.psutil.Error:
                pass
        return total

    def _memory(self):
        while not self.done.wait(0.5):
            pss = 0
            for proc in self._tree():
                try:
                    pss += proc.memory_full_info().pss
                except self.psutil.Error:
                    pass
            self.peak_pss = max(self.peak_pss, pss)

    def _stats(self):
        while not self.done.is_set():
            event = self.event.get_event(wait=0.5, tag="salt/stats", full=True)
            if not event:
                continue
            for cmd, stat in event["data"].get("stats", {}).items():
                runs, secs = self.requests.get(cmd, (0, 0.0))
                self.requests[cmd] = (runs + stat["runs"],
                                      secs + stat["runs"] * stat["mean"])

    def stop(self, lab, nodes):
        cpu = self._cpu() - self.cpu0
        time.sleep(self.opts.get("master_stats_event_iter", 60) + 1)
        for _ in range(2):
            lab.salt("*", "test.ping", timeout=120)
        time.sleep(2)
        self.done.set()
        for thread in self.threads:
            thread.join(5)
        self.event.destroy()
        runs, secs = self.requests.get("_return", (0, 0.0))
        self.requests["_return"] = (max(0, runs - 2 * nodes), secs)
        total = sum(r for r, _ in self.requests.values())
        return {"master_cpu_s": cpu, "master_peak_pss_mib": self.peak_pss / 2 ** 20,
                "master_requests": total, "master_requests_per_node": total / nodes,
                "master_requests_by_cmd": {k: {"runs": r, "worker_s": round(t, 2)}
                                           for k, (r, t) in sorted(self.requests.items())},
                # as set in the master's config file; None: Salt's default pools
                "master_worker_threads": self.raw.get("worker_threads"),
                "master_worker_pools": self.raw.get("worker_pools")}


def timed_apply(conftest, lab, prefix, target="*", fn="state.apply", *extra):
    """Run one state run, timed; returns {prefix_s, prefix_states, prefix_changed, ...}."""
    t = time.monotonic()
    if fn == "state.apply":
        ret = lab.apply(target, "apigee_mtls", *extra)
    else:
        ret = lab.salt(target, fn, "-t", "900", *extra, timeout=1000)
    summary = conftest.state_summary(ret)
    return {f"{prefix}_s": time.monotonic() - t,
            f"{prefix}_states": sum(s["total"] for s in summary.values()),
            f"{prefix}_changed": sum(len(s["changed"]) for s in summary.values()),
            f"{prefix}_changed_ids": {n: s["changed"] for n, s in summary.items() if s["changed"]},
            f"{prefix}_failed": {n: s["failed"] for n, s in summary.items() if s["failed"]}}


def extra_node(model):
    """The node the add-a-node stage adds: next id and IP after the topology's last node,
    a message-processor + router (the role operators add most often)."""
    last = model["nodes"][-1]
    octets = last["ip"].split(".")
    ip = ".".join(octets[:3] + [str(int(octets[3]) + 1)])
    return {"id": f"n{len(model['nodes']) + 1}", "ip": ip,
            "components": ["message-processor", "router"]}


def section_rollout(args):
    """Destroys and re-creates the lab: only ever called for ``--only rollout``."""
    topo = topology_path(args.topology)
    conftest = load_module("lab_conftest", os.path.join(REPO, "tests", "lab", "conftest.py"))
    users = lab_users(conftest.labctl.BRIDGE)
    if users and not args.force:
        listing = "; ".join(f"pid {p}: {c}" for p, c in users)
        return None, f"rollout: refused, the lab is in use ({listing}); --force overrides"
    result = {"meta": section_meta(), "topology": os.path.relpath(topo, REPO), "runs": []}

    def labctl(*argv, timeout=1800):
        t = time.monotonic()
        subprocess.run([sys.executable, LABCTL] + list(argv), check=True, timeout=timeout,
                       stdout=subprocess.DEVNULL)
        return time.monotonic() - t

    def applied(lab, run, key, *apply_args):
        """A timed state run recorded under ``key``; False (and said) when a state failed."""
        run.update(timed_apply(conftest, lab, key, *apply_args))
        if run[f"{key}_failed"]:
            say(f"rollout: {key} failed: {run[f'{key}_failed']}")
        return not run[f"{key}_failed"]

    def ready(lab, run, key):
        t = time.monotonic()
        lab.wait_mesh_ready(timeout=600)
        run[key] = time.monotonic() - t
        run[key[:-2] + "_waited_for"] = lab.mesh_wait_log  # what verify failed on, per round

    for rep in range(args.repeat):
        say(f"rollout #{rep + 1}/{args.repeat}: {result['topology']}")
        run = {"down_s": labctl("down")}
        run["boot_s"] = labctl("up", "--topology", topo, "--no-apply")
        lab = conftest.Lab(topo)
        result["runs"].append(run)
        watch = MasterWatch(conftest.labctl)
        ok = applied(lab, run, "first_apply")
        run.update(watch.stop(lab, len(lab.nodes)))
        if not ok:
            break
        ready(lab, run, "mesh_ready_s")
        run["cold_total_s"] = run["boot_s"] + run["first_apply_s"] + run["mesh_ready_s"]
        run["apply_to_flows_s"] = run["first_apply_s"] + run["mesh_ready_s"]
        if not applied(lab, run, "rerun"):
            break
        if not args.no_add_node:
            # add a node: boot the machine (provisioning, timed apart), then from the pillar
            # edit to its flows working: targeted highstate on it, the peers' one-liner,
            # every node's verify (flows through the mesh) passing
            new = extra_node(lab.model)
            pillar = dict(lab.pillar, nodes=list(lab.pillar["nodes"]) + [new])
            path = os.path.join(conftest.labctl.STATE, "bench-add-node.yaml")
            with open(path, "w", encoding="utf-8") as fh:
                yaml.safe_dump(pillar, fh)
            run["add_boot_s"] = labctl("boot", new["id"], "--topology", path)
            t0 = time.monotonic()
            lab.set_pillar(pillar)
            lab.nodes.append(new["id"])
            run["add_pillar_s"] = time.monotonic() - t0
            if not (applied(lab, run, "add_highstate", new["id"], "state.highstate")
                    and applied(lab, run, "add_peers")):
                break
            ready(lab, run, "add_mesh_ready_s")
            run["add_node_s"] = time.monotonic() - t0
        say(f"rollout #{rep + 1}: " + ", ".join(
            f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in run.items() if not isinstance(v, dict)))
    keys = ("down_s", "boot_s", "first_apply_s", "mesh_ready_s", "apply_to_flows_s",
            "cold_total_s", "rerun_s", "rerun_changed", "first_apply_states",
            "first_apply_changed", "master_cpu_s", "master_peak_pss_mib", "master_requests",
            "master_requests_per_node", "add_boot_s", "add_highstate_s", "add_peers_s",
            "add_peers_changed", "add_mesh_ready_s", "add_node_s")
    complete = [r for r in result["runs"] if "rerun_s" in r]
    result["median"] = {k: median(r.get(k) for r in complete if r.get(k) is not None)
                        for k in keys}
    result["nodes"] = len(conftest.Lab(topo).nodes)
    result["meta"]["loadavg_after"] = loadavg()
    if len(complete) < len(result["runs"]):
        return result, "rollout: a run failed (see above); medians are of the complete runs"
    return result, None


def print_rollout(res):
    m = res["median"]
    labels = [("boot_s", "cold boot s (labctl up --no-apply)"),
              ("first_apply_s", "first state.apply s"),
              ("mesh_ready_s", "apply end -> every flow working (verify) s"),
              ("apply_to_flows_s", "cold rollout: apply start -> every flow working s"),
              ("cold_total_s", "cold total s (boot + rollout)"),
              ("rerun_s", "idempotent rerun s"), ("rerun_changed", "rerun changed states"),
              ("first_apply_states", "states (all nodes)"),
              ("first_apply_changed", "first apply changed states"),
              ("master_cpu_s", "first apply: salt-master CPU s"),
              ("master_peak_pss_mib", "first apply: salt-master peak memory (PSS) MiB"),
              ("master_requests", "first apply: requests to the master"),
              ("master_requests_per_node", "first apply: requests per node"),
              ("add_boot_s", "add a node: boot its machine s"),
              ("add_highstate_s", "add a node: targeted highstate s"),
              ("add_peers_s", "add a node: peers' state.apply s"),
              ("add_peers_changed", "add a node: peers' changed states"),
              ("add_mesh_ready_s", "add a node: apply end -> every flow working s"),
              ("add_node_s", "add a node: pillar edit -> its flows working s")]
    rows = [[label, fmt(m.get(k), ".1f" if k.endswith("_s") else ".0f")] for k, label in labels]
    runs = [r for r in res["runs"] if "rerun_s" in r]
    say(f"\nROLLOUT ({res['topology']}, {res.get('nodes')} nodes, median of {len(runs)} run(s))")
    say(table(["step", "value"], rows))
    if runs and runs[0].get("master_requests_by_cmd"):
        first = runs[0]
        workers = first.get("master_worker_threads") or "not set: Salt's default pools"
        say(f"first apply, run 1: requests to the master by command (worker_threads: {workers})")
        by_cmd = sorted(first["master_requests_by_cmd"].items(), key=lambda kv: -kv[1]["runs"])
        say(table(["command", "requests", "worker s"],
                  [[cmd, str(v["runs"]), f"{v['worker_s']:.1f}"] for cmd, v in by_cmd]))


# ---------------------------------------------------------------------------------------------
def save(results, path):
    """Merge into ``path`` (bench/results.json): sections run now replace their previous
    entry, the others keep theirs."""
    old = {}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as fh:
                old = json.load(fh)
        except ValueError:
            old = {}
    old.update(results)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(old, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description="apigee_mtls benchmarks (see the module docstring)")
    p.add_argument("--only", choices=SECTIONS,
                   help="one section; default: planner, then dataplane if the lab is up "
                        "(rollout only ever runs when named here)")
    p.add_argument("--sizes", default="100,1000,5000",
                   type=lambda s: [int(x) for x in s.split(",") if x.strip()],
                   help="planner: node counts (default 100,1000,5000)")
    p.add_argument("--planner-repeats", type=int, default=5)
    p.add_argument("--plan-budget", type=float, default=120.0,
                   help="planner: measure all nodes' plans only when estimated under this (s)")
    p.add_argument("--max-intentions", type=int, default=5_000_000,
                   help="planner: skip intentions/port_report above this many predicted "
                        "intentions (0 = no limit; 5,000 nodes: 30M, ~9 min for the section, "
                        "11 GiB RSS under tracemalloc)")
    p.add_argument("--dp-repeats", type=int, default=3)
    p.add_argument("--dp-seconds", type=float, default=3.0)
    p.add_argument("--line-bytes", type=int, default=32768,
                   help="dataplane: throughput line size (< 64 KiB: the stand-in's line limit)")
    p.add_argument("--rtt-count", type=int, default=2000)
    p.add_argument("--connect-count", type=int, default=300)
    p.add_argument("--parallel", type=int, default=16)
    p.add_argument("--direct-port", type=int, default=18081)
    p.add_argument("--native-direct-ports", default="15201,15202,15203,15204",
                   type=lambda s: [int(x) for x in s.split(",")][:4],
                   help="native: the direct path's iperf3, sockperf, nginx and openssl "
                        "s_server ports (unmeshed)")
    p.add_argument("--native-profile", action="store_true",
                   help="native: perf-record the two sidecars during one more mesh run "
                        "(needs perf on the host: apt-get install linux-perf)")
    p.add_argument("--zk-window", type=float, default=90.0,
                   help="zookeeper: seconds to wait for a serving ensemble after each event")
    p.add_argument("--force", action="store_true",
                   help="run dataplane/rollout even while tests or captures use the lab")
    p.add_argument("--topology", default="5-node", help="rollout: 5-node, 13-node or a file")
    p.add_argument("--repeat", type=int, default=1, help="rollout: cold rollouts to run")
    p.add_argument("--no-add-node", action="store_true", help="rollout: skip the add-a-node stage")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    if not 0 < args.line_bytes < 65536:
        p.error("--line-bytes must be below 65536 (the stand-in's line limit)")
    out_path = os.path.abspath(args.out)

    sections = [args.only] if args.only else ["planner", "dataplane", "native"]
    results, skipped, failed = {}, [], False
    for name in sections:
        if name == "planner":
            results["planner"] = section_planner(args)
            print_planner(results["planner"])
        elif name == "dataplane":
            try:
                res, why = section_dataplane(args)
            except LabBusy as exc:
                failed = True
                res, why = None, (f"dataplane: aborted, the lab became busy mid-run ({exc}); "
                                  f"nothing recorded, our server was stopped. Rerun when idle")
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                failed = True
                res, why = None, (f"dataplane: failed, nothing recorded: {exc}\n"
                                  f"  (was the lab being changed? `labctl status`, then rerun "
                                  f"`bench/run.py --only dataplane`)")
            if res:
                results["dataplane"] = res
                print_dataplane(res)
            else:
                skipped.append(why)
                say("\n" + why)
        elif name in MODULE_SECTIONS:
            mod = importlib.import_module(MODULE_SECTIONS[name])
            try:
                res, why = getattr(mod, f"section_{name}")(args)
            except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
                failed = True
                res, why = None, f"{name}: failed, nothing recorded: {exc}"
            if res:
                results[name] = res
                getattr(mod, f"print_{name}")(res)
            else:
                skipped.append(why)
                say("\n" + why)
        elif name == "rollout":
            res, why = section_rollout(args)
            if res:
                # one entry per topology: the 5- and 13-node runs do not replace each other
                results["rollout " + os.path.basename(res["topology"])[:-5]] = res
                print_rollout(res)
            if why:
                failed = failed or bool(res)
                skipped.append(why)
                say("\n" + why)
    if results:
        save(results, out_path)
        say(f"\nresults: {os.path.relpath(out_path, os.getcwd())} (sections: "
            f"{', '.join(results)})")
    # exit 1 when a section failed, or when the one section asked for could not run;
    # a section skipped in the default run (no lab) is not an error
    return 1 if failed or (args.only and not results) else 0


if __name__ == "__main__":
    sys.exit(main())
