#!/usr/bin/env python3
"""Data-plane benchmark client, run *inside a lab node* by bench/run.py (system python3,
stdlib only; bench/run.py pipes this file to ``python3 - '<json args>'`` through nsenter).

It talks to a line server with the behaviour of lab/standin.py: for every line received, the
server answers one JSON line that echoes the line (``{"component", "node", ..., "echo": line}``).
One invocation runs one measurement against one target and prints one JSON object:

``{"mode": "throughput", "host": ..., "port": ..., "seconds": 3, "line_bytes": 16384}``
    One connection. A writer thread sends identical lines of ``line_bytes`` (printable ASCII,
    newline-terminated) for ``seconds``; a reader thread reads the echo replies concurrently
    (no deadlock on full windows). Elapsed = first send -> last reply. Every byte crosses the
    path twice (request, echoed reply): the result gives payload MB/s (one way) and the byte
    counts of both directions.
``{"mode": "rtt", "count": 2000, "warmup": 100, "size": 64}``
    One connection, ``count`` sequential round trips of a ``size``-byte line (newline included),
    each timed with perf_counter_ns; percentiles in microseconds.
``{"mode": "connect", "count": 300, "size": 64}``
    ``count`` times: connect, send one line, read the reply line, close; timed end to end.
``{"mode": "parallel", "connections": 16, "seconds": 3, "size": 64}``
    asyncio, ``connections`` connections each doing sequential round trips for ``seconds``;
    total round trips per second plus per-round-trip percentiles.

Every loop is bounded by a count and by a wall-clock cap (``max_seconds``); socket operations
have timeouts. A failure prints ``{"error": ...}`` and exits 1.
"""
import asyncio
import json
import socket
import sys
import threading
import time


def percentiles(samples_ns):
    """p50/p90/p99/max/mean in microseconds of a list of nanosecond durations."""
    if not samples_ns:
        return {}
    s = sorted(samples_ns)
    n = len(s)

    def pick(q):
        return s[min(n - 1, int(q * n))] / 1000.0  # nearest-rank, good enough for n >= 100

    return {"n": n, "p50_us": pick(0.50), "p90_us": pick(0.90), "p99_us": pick(0.99),
            "max_us": s[-1] / 1000.0, "mean_us": sum(s) / n / 1000.0}


def line_of(size):
    """A newline-terminated ASCII line of exactly ``size`` bytes (JSON-safe: no escaping)."""
    body = (b"0123456789abcdefghijklmnopqrstuvwxyz" * (size // 36 + 1))[: size - 1]
    return body + b"\n"


def read_line(sock, buf):
    """Read one reply line from ``sock``; returns (line, rest of buffer)."""
    while True:
        i = buf.find(b"\n")
        if i >= 0:
            return buf[: i + 1], buf[i + 1:]
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk


def connect(host, port, timeout):
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def probe(a):
    """One round trip; returns the parsed reply (proves which server answered, and from where
    it saw the connection come)."""
    sock = connect(a["host"], a["port"], a.get("timeout", 5))
    try:
        sock.sendall(b"bench-probe\n")
        line, _ = read_line(sock, b"")
        return {"reply": json.loads(line)}
    finally:
        sock.close()


def throughput(a):
    seconds = float(a.get("seconds", 3))
    cap = float(a.get("max_seconds", seconds + 20))
    line = line_of(int(a.get("line_bytes", 16384)))
    max_lines = int(a.get("max_lines", 2_000_000))
    sock = connect(a["host"], a["port"], a.get("timeout", 10))
    state = {"sent_lines": 0, "recv_lines": 0, "recv_bytes": 0, "error": None, "t_last": None}
    finished = threading.Event()

    def reader():
        pending = b""
        try:
            while not finished.is_set():
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("server closed the connection")
                state["recv_bytes"] += len(chunk)
                pending += chunk
                n = pending.count(b"\n")
                if n:
                    state["recv_lines"] += n
                    pending = pending[pending.rfind(b"\n") + 1:]
                    state["t_last"] = time.perf_counter()
        except Exception as exc:  # reported unless the main thread already has everything
            if not finished.is_set():
                state["error"] = f"reader: {type(exc).__name__}: {exc}"

    t = threading.Thread(target=reader, daemon=True)
    t0 = time.perf_counter()
    t.start()
    try:
        while (time.perf_counter() - t0 < seconds and state["sent_lines"] < max_lines
               and state["error"] is None):
            sock.sendall(line)
            state["sent_lines"] += 1
    except Exception as exc:
        state["error"] = f"writer: {type(exc).__name__}: {exc}"
    # drain: wait (bounded) for the reply to every line sent
    while (state["error"] is None and state["recv_lines"] < state["sent_lines"]
           and time.perf_counter() - t0 < cap):
        time.sleep(0.002)
    finished.set()
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
    t.join(timeout=5)
    if state["error"] is None and state["recv_lines"] < state["sent_lines"]:
        state["error"] = f"only {state['recv_lines']}/{state['sent_lines']} replies within {cap}s"
    if state["error"]:
        raise RuntimeError(state["error"])
    elapsed = state["t_last"] - t0
    sent = state["sent_lines"] * len(line)
    return {"elapsed_s": elapsed, "lines": state["sent_lines"], "line_bytes": len(line),
            "sent_bytes": sent, "recv_bytes": state["recv_bytes"],
            "mb_per_s": sent / elapsed / 1e6}


def rtt(a):
    count, warmup = int(a.get("count", 2000)), int(a.get("warmup", 100))
    cap = float(a.get("max_seconds", 60))
    line = line_of(int(a.get("size", 64)))
    sock = connect(a["host"], a["port"], a.get("timeout", 5))
    samples, buf = [], b""
    t_start = time.perf_counter()
    try:
        for i in range(warmup + count):
            if time.perf_counter() - t_start > cap:
                break
            t = time.perf_counter_ns()
            sock.sendall(line)
            _, buf = read_line(sock, buf)
            if i >= warmup:
                samples.append(time.perf_counter_ns() - t)
    finally:
        sock.close()
    return {"wall_s": time.perf_counter() - t_start, **percentiles(samples)}


def connect_rtt(a):
    count = int(a.get("count", 300))
    cap = float(a.get("max_seconds", 60))
    line = line_of(int(a.get("size", 64)))
    samples, errors = [], 0
    t_start = time.perf_counter()
    for _ in range(count):
        if time.perf_counter() - t_start > cap:
            break
        t = time.perf_counter_ns()
        try:
            sock = connect(a["host"], a["port"], a.get("timeout", 5))
            try:
                sock.sendall(line)
                read_line(sock, b"")
            finally:
                sock.close()
        except OSError:
            errors += 1
            continue
        samples.append(time.perf_counter_ns() - t)
    return {"wall_s": time.perf_counter() - t_start, "errors": errors, **percentiles(samples)}


def parallel(a):
    conns = int(a.get("connections", 16))
    seconds = float(a.get("seconds", 3))
    line = line_of(int(a.get("size", 64)))
    timeout = float(a.get("timeout", 5))

    async def worker(deadline, samples):
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(a["host"], a["port"]), timeout)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop = asyncio.get_running_loop()
        try:
            while loop.time() < deadline:
                t = time.perf_counter_ns()
                writer.write(line)
                await writer.drain()
                await asyncio.wait_for(reader.readline(), timeout)
                samples.append(time.perf_counter_ns() - t)
        finally:
            writer.close()

    async def main():
        samples = []
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        deadline = loop.time() + seconds
        await asyncio.gather(*(worker(deadline, samples) for _ in range(conns)))
        return samples, time.perf_counter() - t0

    samples, elapsed = asyncio.run(main())
    return {"connections": conns, "elapsed_s": elapsed, "round_trips": len(samples),
            "rps": len(samples) / elapsed, **percentiles(samples)}


MODES = {"probe": probe, "throughput": throughput, "rtt": rtt, "connect": connect_rtt,
         "parallel": parallel}


def main():
    args = json.loads(sys.argv[1])
    try:
        out = MODES[args["mode"]](args)
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    out.update({"mode": args["mode"], "host": args["host"], "port": args["port"]})
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
