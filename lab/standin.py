#!/usr/bin/env python3
"""Stand-in Apigee component servers for the lab.

Listens on every port of every component the node hosts (config: /etc/apigee-standin.json,
``{"node": "n1", "ip": "10.77.0.11", "listeners": [{"component": "zookeeper", "port": 2181,
"bind": "::"}, ...]}``). ``"::"`` is dual-stack (IPV6_V6ONLY off), as PostgreSQL with
``listen_addresses='*'`` and most JVMs listen: IPv4 and IPv6 on one socket. For each line a client sends, it answers one JSON line saying who
and where it is, so a test can prove that a connection reached the right component on the right
node, and what address the connection came from (through the mesh: the local sidecar).
"""
import asyncio
import json
import socket
import sys

CONFIG = sys.argv[1] if len(sys.argv) > 1 else "/etc/apigee-standin.json"


def _peer(peer):
    """``ip:port`` of a client; an IPv4 client of a dual-stack socket shows as plain IPv4."""
    if not peer:
        return None
    host = peer[0][len("::ffff:"):] if peer[0].startswith("::ffff:") else peer[0]
    return f"{host}:{peer[1]}"


def _dual_stack(port):
    """A listening socket on [::]:port that takes IPv4 too (asyncio would set V6ONLY);
    None when the kernel has no IPv6 (the caller binds 0.0.0.0 instead)."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return None
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::", port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def _serve(cfg, listener):
    handle = handler(cfg, listener)
    if listener["bind"] in ("::", "0.0.0.0"):
        sock = _dual_stack(listener["port"])
        if sock is not None:
            return await asyncio.start_server(handle, sock=sock)
        return await asyncio.start_server(handle, "0.0.0.0", listener["port"],
                                          reuse_address=True)
    return await asyncio.start_server(handle, listener["bind"], listener["port"],
                                      reuse_address=True)


def handler(cfg, listener):
    async def handle(reader, writer):
        peer = writer.get_extra_info("peername")
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                reply = {
                    "component": listener["component"],
                    "node": cfg["node"],
                    "ip": cfg["ip"],
                    "port": listener["port"],
                    "peer": _peer(peer),
                    "echo": line.decode(errors="replace").strip(),
                }
                writer.write((json.dumps(reply, sort_keys=True) + "\n").encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return handle


async def main():
    with open(CONFIG, encoding="utf-8") as fh:
        cfg = json.load(fh)
    servers = []
    for listener in cfg["listeners"]:
        servers.append(await _serve(cfg, listener))
    print(f"stand-in {cfg['node']}: {len(servers)} listeners", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main())
