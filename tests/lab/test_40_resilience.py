"""Failure tests: the mesh keeps or regains service by itself (no Salt run needed)."""
import json
import subprocess
import time

from conftest import labctl, state_summary


def _main_pid(lab, node, unit):
    out = lab.run(node, ["systemctl", "show", "-p", "MainPID", "--value", unit]).stdout
    return int(out.strip() or 0)


def test_killed_proxy_is_restarted_and_flows_recover_without_salt(mesh):
    lab = mesh
    unit = lab.salt("n1", "apigee_mtls.plan")["n1"]["egress"]["unit"]
    old = _main_pid(lab, "n1", unit)
    assert old > 0
    lab.run("n1", ["kill", "-9", str(old)])
    deadline = time.monotonic() + 30
    new = 0
    while time.monotonic() < deadline:
        new = _main_pid(lab, "n1", unit)
        if new and new != old:
            break
        time.sleep(0.5)
    assert new and new != old, "systemd did not restart the killed proxy"
    # the restarted proxy binds its upstreams again; flows from n1 work without Salt
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = lab.requests("n1", [(lab.ip["n2"], 8081, "after-kill")])[0]
        if r.get("node") == "n2":
            break
        time.sleep(1)
    assert r.get("node") == "n2", r


LEADER_CODE = ("import urllib.request; print(urllib.request.urlopen("
               "'http://127.0.0.1:8500/v1/status/leader', timeout=3).read().decode())")

HOLD_CODE = """
import json, socket, sys, time
# an established connection through the mesh, used before, during and after the election
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
f = s.makefile("rwb")
res = []
for i in range(int(sys.argv[3])):
    f.write(b"tick %d\\n" % i); f.flush()
    line = f.readline()
    res.append(bool(line))
    time.sleep(0.5)
print(json.dumps(res))
"""


def test_stopping_the_consul_leader_elects_another_and_flows_continue(mesh, record_property):
    """No timed assertion (speed belongs in benchmarks): the election time is recorded."""
    lab = mesh
    servers = [n for n in lab.nodes
               if "zookeeper" in next(x for x in lab.model["nodes"] if x["id"] == n)["components"]]
    leader_addr = lab.run(servers[0], ["python3", "-c", LEADER_CODE]).stdout.strip().strip('"')
    leader = next(n for n in servers if leader_addr.startswith(lab.ip[n] + ":"))
    other = next(n for n in servers if n != leader)
    client = next(n for n in lab.nodes if n not in servers)  # n4: postgres/qpid
    # hold an established flow from the client to zookeeper on a surviving server
    holder = subprocess.Popen(
        labctl.node_exec_cmd(client, ["python3", "-c", HOLD_CODE, lab.ip[other], "2181", "24"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    t0 = time.monotonic()
    lab.run(leader, "systemctl stop consul")
    try:
        new_leader, elected_after = "", None
        while time.monotonic() - t0 < 60:
            out = lab.run(other, ["python3", "-c", LEADER_CODE], check=False).stdout.strip()
            if out and out != '""' and not out.strip('"').startswith(lab.ip[leader] + ":"):
                new_leader, elected_after = out, time.monotonic() - t0
                break
            time.sleep(0.25)
        assert new_leader, "no new leader within 60 s"
        record_property("election_seconds", round(elected_after, 2))
        print(f"new leader {new_leader} after {elected_after:.1f}s")
        # new connections through the mesh succeed once a leader is elected
        r = lab.requests(client, [(lab.ip[other], 2181, "new-after-election")])[0]
        assert r.get("node") == other, r
        held = json.loads(holder.communicate(timeout=60)[0])
        assert held and all(held), f"the established flow broke: {held}"
    finally:
        lab.run(leader, "systemctl start consul")
        if holder.poll() is None:
            holder.kill()
    lab.wait_mesh_ready()
    rerun = state_summary(lab.apply())
    assert all(not s["changed"] and not s["failed"] for s in rerun.values()), rerun


