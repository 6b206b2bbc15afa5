#!/usr/bin/env python3
"""Stand-in Apigee component servers for the lab.

Listens on every port of every component the node hosts (config: /etc/apigee-standin.json,
``{"node": "n1", "ip": "10.77.0.11", "listeners": [{"component": "zookeeper", "port": 2181,
"bind": "0.0.0.0"}, ...]}``). For each line a client sends, it answers one JSON line saying who
and where it is, so a test can prove that a connection reached the right component on the right
node, and what address the connection came from (through the mesh: the local sidecar).
"""
import asyncio
import json
import sys

CONFIG = sys.argv[1] if len(sys.argv) > 1 else "/etc/apigee-standin.json"


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
                    "peer": f"{peer[0]}:{peer[1]}" if peer else None,
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
        servers.append(
            await asyncio.start_server(
                handler(cfg, listener), listener["bind"], listener["port"], reuse_address=True
            )
        )
    print(f"stand-in {cfg['node']}: {len(servers)} listeners", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main())
