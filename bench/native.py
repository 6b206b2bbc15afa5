"""The data plane measured with native endpoints (``bench/run.py --only native``): iperf3 for
throughput, sockperf for round trips, nginx and ApacheBench (``ab``) for new connections, all
from Debian 12 in the lab's rootfs, so that the direct baseline is the network and the kernel,
not a Python stand-in (the ``dataplane`` section's servers, single-threaded Python, cap the
direct path at about 235 MB/s).

Between the first management-server node (client) and the first router node on another node
(server), in one run, interleaved (direct, mesh, then mesh, direct, ...):

* MESH: the client connects to ``<router node IP>:<router port>`` as an Edge component would;
  its nat chain redirects it to its egress sidecar, which opens mTLS to the router's ingress
  sidecar, which hands plaintext to the server on ``127.0.0.1:<port>`` (where the stand-in
  component listens the rest of the time: the bench moves the stand-in off the router's ports
  for the duration and puts it back, restarted, at the end). iperf3 on the router's 4527,
  sockperf on its 8081, nginx on the message processor's 8082 (the same node).
* DIRECT: the same programs on the router node's IP, on ports no proxy, component or
  firewall rule knows (``--native-direct-ports``, default 15201, 15202 and 15203).

Metrics: single-stream and 16-stream throughput (``iperf3 -t``, received bits/s), round trip
p50/p99 (``sockperf ping-pong --full-rtt``, 64-byte messages), and the sidecars' CPU seconds
per GiB through them (``/proc/<pid>/stat`` of the two ``consul connect proxy`` processes,
around each mesh iperf3 run), and new connection + first round trip (``ab -n
--connect-count -c 1`` without ``-k``: every request opens its own TCP connection, sends a GET
and reads nginx's 3-byte answer; nginx is event-driven, one worker, so the direct path pays no
fork; p50/p99 from ab's ``-e`` percentiles, in ms with three decimals). Beside them, the floor
of any data plane that opens mutual TLS per connection: ``openssl s_time -new`` against
``openssl s_server -Verify`` on an unmeshed port (TLS 1.3, ECDSA P-256 leaf certificates from a
throw-away CA, as Consul's Connect CA issues; C at both ends, no proxy, no Consul), reported as
wall milliseconds per connection, with full handshakes (``-new``) and resumed sessions
(``-reuse``). Nothing is asserted: figures and ratios are printed and saved, medians over
``--dp-repeats``.
"""
import json
import os
import re
import shutil
import subprocess
import time

import run as h  # bench/run.py: lab helpers (lab_running, find_pids, proc_cpu_seconds, ...)

# the meshed ports the native servers take over on the destination node (loopback targets):
# the router's two, and the message processor's 8082 for nginx
MESH_PORTS = {"iperf3": 4527, "sockperf": 8081, "nginx": 8082}
NGINX_CONF = "/run/amtls-bench-nginx.conf"
_PCT = re.compile(r"percentile (\d+\.\d+) =\s+([\d.]+)")
_UNIT = "amtls-bench-{}"


_node = h.node_run


def sockperf_percentiles(text):
    """``{"p50_us": .., "p99_us": ..}`` from ``sockperf ping-pong`` output (microseconds)."""
    pct = {float(p): float(v) for p, v in _PCT.findall(text)}
    if 50.0 not in pct or 99.0 not in pct:
        raise RuntimeError(f"sockperf: no percentiles in its output: {text[-400:]}")
    return {"p50_us": pct[50.0], "p99_us": pct[99.0]}


def ab_percentiles(text):
    """``{"p50_ms": .., "p99_ms": .., "requests": ..}`` from ApacheBench's ``-e`` CSV (lines
    ``<percentage>,<ms>``: the time within which that share of the requests completed).

    :raises RuntimeError: the CSV lacks the 50 or 99 row."""
    pct = {}
    for line in text.splitlines():
        head, _, value = line.partition(",")
        if head.strip().isdigit():
            pct[int(head)] = float(value)
    if 50 not in pct or 99 not in pct:
        raise RuntimeError(f"ab: no percentiles in its CSV: {text[:400]!r}")
    return {"p50_ms": pct[50], "p99_ms": pct[99]}


def ab_failures(text):
    """Failed and non-2xx requests from ``ab``'s report (0 when the lines are absent)."""
    failed = re.search(r"^Failed requests:\s+(\d+)", text, re.M)
    non2xx = re.search(r"^Non-2xx responses:\s+(\d+)", text, re.M)
    return (int(failed.group(1)) if failed else 0) + (int(non2xx.group(1)) if non2xx else 0)


def nginx_conf(mesh_port, ip, direct_port):
    """One nginx, one worker, answering ``ok`` on the mesh target (loopback) and on the direct
    port of the node's IP: the same process serves both paths."""
    return f"""daemon off;
worker_processes 1;
pid /run/amtls-bench-nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  server {{
    listen 127.0.0.1:{mesh_port};
    listen {ip}:{direct_port};
    location / {{ return 200 "ok\\n"; }}
  }}
}}
"""


_S_TIME = re.compile(r"(\d+) connections in [\d.]+s;")
_WALL = re.compile(r"^wall (\d+) (\d+)$", re.M)
_BYTES = re.compile(r"(\d+) bytes read per connection")


def s_time_per_connection(text):
    """Wall milliseconds per connection from ``openssl s_time -new`` output framed by a
    ``wall <start ns> <end ns>`` line (see :func:`tls_handshakes`).

    :raises RuntimeError: no connection completed, or none read the page (a failed handshake
        reads 0 bytes)."""
    count, wall, got = _S_TIME.search(text), _WALL.search(text), _BYTES.search(text)
    if not count or not wall or not got or int(count.group(1)) == 0 or int(got.group(1)) == 0:
        raise RuntimeError(f"openssl s_time: no completed connection: {text[-400:]!r}")
    elapsed_ms = (int(wall.group(2)) - int(wall.group(1))) / 1e6
    return {"per_connection_ms": elapsed_ms / int(count.group(1)),
            "connections": int(count.group(1))}


TLS_DIR = "/run/amtls-bench-tls"
TLS_SETUP = f"""set -e
rm -rf {TLS_DIR} && mkdir -m 0700 {TLS_DIR} && cd {TLS_DIR}
ec() {{
  k=$1; shift
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$k.key" "$@"
}}
ec ca -x509 -days 1 -subj /CN=bench-ca -out ca.crt 2>/dev/null
for n in server client; do
  ec $n -subj /CN=$n -out $n.csr 2>/dev/null
  openssl x509 -req -in $n.csr -CA ca.crt -CAkey ca.key -days 1 -out $n.crt 2>/dev/null
done
echo ok > ok.txt
"""


def tls_handshakes(labctl, src, dst, ip, port, seconds):
    """Native mutual-TLS floor: ``openssl s_time`` on ``src`` against ``openssl s_server
    -Verify 1 -verify_return_error`` on ``dst``'s ``ip:port``, ``seconds`` with full
    handshakes (``-new``), then ``seconds`` with resumed sessions (``-reuse``, what a proxy
    with a session cache would pay; Consul 1.8's built-in proxy keeps none). Returns
    ``{"new": .., "reuse": ..}``, each :func:`s_time_per_connection`'s dict. The server runs
    as a transient unit, stopped at the end; the throw-away keys live in ``/run`` of the two
    nodes."""
    _node(labctl, dst, ["sh", "-c", TLS_SETUP])
    files = {}
    for name in ("ca.crt", "client.crt", "client.key"):
        files[name] = _node(labctl, dst, ["cat", f"{TLS_DIR}/{name}"]).stdout
    _node(labctl, src, ["sh", "-c", f"rm -rf {TLS_DIR} && mkdir -m 0700 {TLS_DIR}"])
    for name, text in files.items():
        subprocess.run(labctl.node_exec_cmd(src, ["sh", "-c", f"cat > {TLS_DIR}/{name}"]),
                       input=text, text=True, capture_output=True, timeout=60, check=True)
    unit = _UNIT.format("tls")
    _node(labctl, dst, ["systemctl", "reset-failed", unit], check=False)
    _node(labctl, dst, ["systemd-run", "--unit", unit, "--collect",
                        "--property=RuntimeMaxSec=600", f"--working-directory={TLS_DIR}",
                        "openssl", "s_server", "-quiet", "-WWW", "-accept", f"{ip}:{port}",
                        "-cert", "server.crt", "-key", "server.key", "-CAfile", "ca.crt",
                        "-Verify", "1", "-verify_return_error"])
    try:
        deadline = time.monotonic() + 20
        while f":{port} " not in _node(labctl, dst, ["ss", "-Hltn"]).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"openssl s_server on {dst} did not listen on {port}")
            time.sleep(0.3)
        res = {}
        for mode in ("new", "reuse"):
            res[mode] = s_time_per_connection(_node(labctl, src, ["sh", "-c", (
                f"cd {TLS_DIR} && a=$(date +%s%N) && openssl s_time -connect {ip}:{port} "
                f"-{mode} -time {seconds} -www /ok.txt -cert client.crt -key client.key "
                f"-CAfile ca.crt -verify 1 2>&1; b=$(date +%s%N); echo \"wall $a $b\"")],
                timeout=int(seconds) + 60).stdout)
        return res
    finally:
        _node(labctl, dst, ["systemctl", "stop", unit], check=False)
        for node in (src, dst):
            _node(labctl, node, ["rm", "-rf", TLS_DIR], check=False)


def iperf3_summary(text):
    """Received throughput (Gbit/s) and CPU use from ``iperf3 -J`` output."""
    data = json.loads(text)
    if data.get("error"):
        raise RuntimeError(f"iperf3: {data['error']}")
    end = data["end"]
    return {"gbit_s": end["sum_received"]["bits_per_second"] / 1e9,
            "bytes": end["sum_received"]["bytes"],
            "seconds": end["sum_received"]["seconds"],
            "cpu_client_pct": end["cpu_utilization_percent"]["host_total"],
            "cpu_server_pct": end["cpu_utilization_percent"]["remote_total"]}


class Servers:
    """iperf3 and sockperf servers inside the router node, as transient systemd units of its
    own systemd (stopped by name at the end), for both paths; the stand-in's router listeners
    are moved off meanwhile and put back after."""

    CONFIG = "/etc/apigee-standin.json"

    def __init__(self, labctl, node, ip, direct_ports):
        self.labctl, self.node, self.units = labctl, node, []
        self.original = _node(labctl, node, ["cat", self.CONFIG]).stdout
        cfg = json.loads(self.original)
        cfg["listeners"] = [x for x in cfg["listeners"] if x["port"] not in MESH_PORTS.values()]
        self._write(json.dumps(cfg, indent=1))
        _node(labctl, node, ["systemctl", "restart", "apigee-standin"])
        self._write(nginx_conf(MESH_PORTS["nginx"], ip, direct_ports[2]), NGINX_CONF)
        specs = {
            "iperf3-mesh": ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(MESH_PORTS["iperf3"])],
            "iperf3-direct": ["iperf3", "-s", "-B", ip, "-p", str(direct_ports[0])],
            "sockperf-mesh": ["sockperf", "server", "--tcp", "-i", "127.0.0.1", "-p",
                              str(MESH_PORTS["sockperf"])],
            "sockperf-direct": ["sockperf", "server", "--tcp", "-i", ip, "-p",
                                str(direct_ports[1])],
            "nginx": ["nginx", "-c", NGINX_CONF],
        }
        for name, argv in specs.items():
            unit = _UNIT.format(name)
            _node(labctl, node, ["systemctl", "reset-failed", unit], check=False)
            _node(labctl, node, ["systemd-run", "--unit", unit, "--collect",
                                 "--property=RuntimeMaxSec=1800", *argv])
            self.units.append(unit)
        want = [*MESH_PORTS.values(), *direct_ports[:3]]  # [3]: tls_handshakes
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = _node(labctl, node, ["ss", "-Hltn"]).stdout
            if all(f":{p} " in out for p in want):
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"native servers on {node} did not listen on {want}")

    def _write(self, text, path=CONFIG):
        proc = subprocess.run(self.labctl.node_exec_cmd(
            self.node, ["sh", "-c", f"cat > {path}.new && mv {path}.new {path}"]),
            input=text, capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{self.node}: cannot write {path}: {proc.stderr}")

    def stop(self):
        for unit in self.units:
            _node(self.labctl, self.node, ["systemctl", "stop", unit], check=False)
        self.units = []
        self._write(self.original)
        _node(self.labctl, self.node, ["systemctl", "restart", "apigee-standin"], check=False)


def section_native(args):
    """Run the native benchmark on the running lab; returns ``(result, None)`` or
    ``(None, why it was skipped)``."""
    labctl, why = h.lab_for("native", args)
    if labctl is None:
        return None, why
    pillar = labctl.load_topology(labctl.load_state()["topology"])
    model = h.planner.normalize(pillar)
    live = [n for n in model["nodes"] if not n["retired"]]
    src = next((n for n in live if "management-server" in n["components"]), None)
    dst = next((n for n in live if "router" in n["components"] and n is not src), None)
    if src is None or dst is None:
        return None, "native: skipped, no management-server and router on two nodes"
    found = _node(labctl, src["id"], ["sh", "-c", "command -v iperf3; command -v sockperf; "
                                      "command -v ab; command -v nginx"],
                  check=False).stdout.split()
    if len(found) < 4:
        return None, ("native: skipped, iperf3/sockperf/ab/nginx are not in the lab's rootfs "
                      "(a lab built before they were added: `make lab-down`, then `make lab`)")
    egress = h.planner.plan(pillar, src["id"])["egress"]["id"]
    pids = {}
    for label, svc in (("egress", egress),
                       ("ingress", h.planner.service_name("router", MESH_PORTS["iperf3"],
                                                          dst["ip"]))):
        found = h.find_pids(rf"consul connect proxy -sidecar-for {svc}( |$)")
        if len(found) != 1:
            return None, f"native: expected one sidecar process for {svc}, found {found}"
        pids[label] = found[0]
    direct = args.native_direct_ports
    targets = {"direct": {"iperf3": direct[0], "sockperf": direct[1], "nginx": direct[2]},
               "mesh": dict(MESH_PORTS)}
    h.say(f"native: {src['id']} -> {dst['id']} ({dst['ip']}): MESH ports {MESH_PORTS} vs "
          f"DIRECT ports {direct}")
    result = {"meta": h.section_meta(), "client": src["id"], "server": dst["id"],
              "targets": targets, "proxy_pids": pids,
              "settings": {"repeats": args.dp_repeats, "seconds": args.dp_seconds,
                           "parallel": args.parallel, "connect_count": args.connect_count}}
    runs = {p: {"single": [], "parallel": [], "rtt": [], "connect": []} for p in targets}
    tls_floor = []
    cpu = {"seconds": 0.0, "bytes": 0}
    budget = {p: {"bytes": 0, "client": 0.0, "server": 0.0, "sidecars": 0.0} for p in targets}
    servers = Servers(labctl, dst["id"], dst["ip"], direct)
    try:
        seconds = str(max(1, int(args.dp_seconds)))
        for rep in range(args.dp_repeats):
            for path in (["direct", "mesh"] if rep % 2 == 0 else ["mesh", "direct"]):
                port = targets[path]
                for name, extra in (("single", []), ("parallel", ["-P", str(args.parallel)])):
                    before = sum(h.proc_cpu_seconds(p) for p in pids.values())
                    out = iperf3_summary(_node(labctl, src["id"], [
                        "iperf3", "-c", dst["ip"], "-p", str(port["iperf3"]), "-t", seconds,
                        "-J", *extra], timeout=int(seconds) + 60).stdout)
                    used = sum(h.proc_cpu_seconds(p) for p in pids.values()) - before
                    if name == "single":
                        # CPU seconds each process spent (iperf3 reports its ends' CPU as
                        # a percentage of the test's wall time)
                        budget[path]["bytes"] += out["bytes"]
                        for end in ("client", "server"):
                            budget[path][end] += out[f"cpu_{end}_pct"] / 100 * out["seconds"]
                        if path == "mesh":
                            budget[path]["sidecars"] += used
                            cpu["seconds"] += used
                            cpu["bytes"] += out["bytes"]
                    runs[path][name].append(out)
                    h.say(f"  {name:8} {path:6} #{rep + 1}: {out['gbit_s']:.2f} Gbit/s")
                rtt = sockperf_percentiles(_node(labctl, src["id"], [
                    "sockperf", "ping-pong", "--tcp", "-i", dst["ip"], "-p",
                    str(port["sockperf"]), "-t", seconds, "--msg-size", "64", "--full-rtt"],
                    timeout=int(seconds) + 60).stdout)
                runs[path]["rtt"].append(rtt)
                h.say(f"  rtt      {path:6} #{rep + 1}: p50 {rtt['p50_us']:.0f}us "
                      f"p99 {rtt['p99_us']:.0f}us")
                conn = new_connections(labctl, src["id"], dst["ip"], port["nginx"],
                                       args.connect_count)
                runs[path]["connect"].append(conn)
                h.say(f"  connect  {path:6} #{rep + 1}: p50 {conn['p50_ms']:.3f}ms "
                      f"p99 {conn['p99_ms']:.3f}ms ({conn['failed']} failed)")
            floor = tls_handshakes(labctl, src["id"], dst["id"], dst["ip"], direct[3], seconds)
            tls_floor.append(floor)
            h.say(f"  mTLS floor #{rep + 1}: {floor['new']['per_connection_ms']:.3f}ms per "
                  f"full handshake, {floor['reuse']['per_connection_ms']:.3f}ms resumed "
                  f"(openssl s_time, {seconds}s each)")
        if getattr(args, "native_profile", False):
            result["profile"] = profile_sidecars(labctl, src, dst, pids, seconds)
    finally:
        servers.stop()
    summary = {}
    for path, r in runs.items():
        summary[path] = {
            "single_gbit_s": h.median(x["gbit_s"] for x in r["single"]),
            "parallel_gbit_s": h.median(x["gbit_s"] for x in r["parallel"]),
            "rtt_p50_us": h.median(x["p50_us"] for x in r["rtt"]),
            "rtt_p99_us": h.median(x["p99_us"] for x in r["rtt"]),
            "connect_p50_ms": h.median(x["p50_ms"] for x in r["connect"]),
            "connect_p99_ms": h.median(x["p99_ms"] for x in r["connect"]),
            "connect_failed": sum(x["failed"] for x in r["connect"]),
        }
    direct_connect = summary["direct"]["connect_p50_ms"]
    for mode in ("new", "reuse"):
        summary[f"tls_{mode}_ms"] = h.median(x[mode]["per_connection_ms"] for x in tls_floor)
        summary[f"tls_{mode}_over_direct"] = (summary[f"tls_{mode}_ms"] / direct_connect
                                             if direct_connect else None)
    summary["mesh"]["proxy_cpu_s_per_gib"] = (cpu["seconds"] / (cpu["bytes"] / h.GiB)
                                              if cpu["bytes"] else None)
    summary["cpu_s_per_gib"] = {
        path: {k: (b[k] / (b["bytes"] / h.GiB) if b["bytes"] else None)
               for k in ("client", "server", "sidecars")} for path, b in budget.items()}
    summary["ratio_mesh_over_direct"] = {
        k: summary["mesh"][k] / summary["direct"][k] if summary["direct"][k] else None
        for k in ("single_gbit_s", "parallel_gbit_s", "rtt_p50_us", "rtt_p99_us",
                  "connect_p50_ms", "connect_p99_ms")}
    result.update(summary=summary, runs=runs, cpu=cpu, tls_floor=tls_floor)
    result["meta"]["loadavg_after"] = h.loadavg()
    return result, None


def new_connections(labctl, node, ip, port, count):
    """``ab -n count -c 1`` (no keep-alive: a TCP connection per request) from ``node`` to
    ``http://ip:port/``; returns ``{"p50_ms", "p99_ms", "failed"}``.

    :raises ValueError: ``count`` below 100: ab's CSV row ``i`` reads sample
        ``int(0.5 + count * i / 100)``, past the last one for the 99th below 51 requests."""
    if count < 100:
        raise ValueError(f"new_connections: count {count}: at least 100 requests")
    csv = "/run/amtls-bench-ab.csv"
    out = _node(labctl, node, ["ab", "-q", "-n", str(count), "-c", "1", "-e", csv,
                               f"http://{ip}:{port}/"], timeout=count + 60).stdout
    res = ab_percentiles(_node(labctl, node, ["cat", csv]).stdout)
    res["failed"] = ab_failures(out)
    return res


def perf_shares(text):
    """``[(share %, dso or symbol), ...]`` from ``perf report --stdio`` output (its
    percentage lines, in the order printed)."""
    rows = []
    for line in text.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(.+?)\s*$", line)
        if m and not line.lstrip().startswith("#"):
            rows.append((float(m.group(1)), re.sub(r"\s+", " ", m.group(2))))
    return rows


def profile_sidecars(labctl, src, dst, pids, seconds):
    """``perf record`` (host side, 999 Hz) on the egress and ingress sidecars during one more
    1-stream mesh iperf3 run: the share of their samples per DSO (the kernel against the
    consul binary, which is stripped: Go functions are not named) and the top kernel symbols.
    ``None`` when ``perf`` is not installed (``apt-get install linux-perf``)."""
    if not shutil.which("perf"):
        return None
    data = "/tmp/amtls-bench-sidecars.perf"
    rec = subprocess.Popen(["perf", "record", "-q", "-F", "999", "-o", data,
                            "-p", ",".join(str(p) for p in pids.values()),
                            "--", "sleep", str(int(seconds) + 1)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    _node(labctl, src["id"], ["iperf3", "-c", dst["ip"], "-p", str(MESH_PORTS["iperf3"]),
                              "-t", seconds, "-J"], timeout=int(seconds) + 60)
    rec.wait(timeout=int(seconds) + 60)
    out = {}
    for key, sort in (("dso", "dso"), ("symbols", "dso,sym")):
        rep = subprocess.run(["perf", "report", "--stdio", "-i", data, "--no-children",
                              "--sort", sort, "--percent-limit", "1"],
                             capture_output=True, text=True, timeout=120, check=False)
        out[key] = perf_shares(rep.stdout)
    os.unlink(data)
    return out


def print_native(res):
    s = res["summary"]
    d, m, ratio = s["direct"], s["mesh"], s["ratio_mesh_over_direct"]
    rows = [
        ["throughput, 1 stream (Gbit/s)", h.fmt(d["single_gbit_s"], ".2f"),
         h.fmt(m["single_gbit_s"], ".2f"), h.fmt(ratio["single_gbit_s"], ".2f") + "x"],
        [f"throughput, {res['settings']['parallel']} streams (Gbit/s)",
         h.fmt(d["parallel_gbit_s"], ".2f"), h.fmt(m["parallel_gbit_s"], ".2f"),
         h.fmt(ratio["parallel_gbit_s"], ".2f") + "x"],
        ["round trip p50 (us)", h.fmt(d["rtt_p50_us"], ".0f"), h.fmt(m["rtt_p50_us"], ".0f"),
         h.fmt(ratio["rtt_p50_us"], ".2f") + "x"],
        ["round trip p99 (us)", h.fmt(d["rtt_p99_us"], ".0f"), h.fmt(m["rtt_p99_us"], ".0f"),
         h.fmt(ratio["rtt_p99_us"], ".2f") + "x"],
        ["new connection + first round trip p50 (ms)", h.fmt(d.get("connect_p50_ms"), ".3f"),
         h.fmt(m.get("connect_p50_ms"), ".3f"),
         h.fmt(ratio.get("connect_p50_ms"), ".2f") + "x"],
        ["new connection + first round trip p99 (ms)", h.fmt(d.get("connect_p99_ms"), ".3f"),
         h.fmt(m.get("connect_p99_ms"), ".3f"),
         h.fmt(ratio.get("connect_p99_ms"), ".2f") + "x"],
        ["mutual TLS, no proxy: openssl s_time -new, mean (ms)",
         h.fmt(s.get("tls_new_ms"), ".3f"), "-",
         h.fmt(s.get("tls_new_over_direct"), ".2f") + "x"],
        ["mutual TLS, no proxy, resumed: s_time -reuse, mean (ms)",
         h.fmt(s.get("tls_reuse_ms"), ".3f"), "-",
         h.fmt(s.get("tls_reuse_over_direct"), ".2f") + "x"],
        ["sidecars' CPU s per GiB (1 stream)", "-", h.fmt(m["proxy_cpu_s_per_gib"], ".2f"),
         ""],
    ]
    h.say(f"\nnative data plane ({res['client']} -> {res['server']}; iperf3, sockperf, ab -> "
          f"nginx ({res['settings'].get('connect_count')} connections, "
          f"{s['mesh'].get('connect_failed')} failed through the mesh); "
          f"medians of {res['settings']['repeats']}, load {res['meta'].get('loadavg_before')} -> "
          f"{res['meta'].get('loadavg_after')})")
    h.say(h.table(["metric", "direct", "mesh", "mesh/direct"], rows))
    per = s.get("cpu_s_per_gib")
    if per:
        rows = []
        for path in ("direct", "mesh"):
            b = per[path]
            total = sum(v for v in b.values() if v)
            rows.append([path, h.fmt(b["client"], ".2f"), h.fmt(b["server"], ".2f"),
                         h.fmt(b["sidecars"] if path == "mesh" else None, ".2f"),
                         h.fmt(total, ".2f")])
        h.say("CPU seconds per GiB moved, 1 stream (iperf3's own figures; sidecars from /proc)")
        h.say(h.table(["path", "iperf3 client", "iperf3 server", "both sidecars", "total"],
                      rows))
    prof = res.get("profile")
    if prof:
        h.say("sidecars' perf samples (1 stream, mesh): by DSO, then the top symbols")
        h.say(h.table(["share %", "where"],
                      [[f"{pct:.1f}", what] for pct, what in prof["dso"][:6]]
                      + [["", ""]]
                      + [[f"{pct:.1f}", what] for pct, what in prof["symbols"][:12]]))
