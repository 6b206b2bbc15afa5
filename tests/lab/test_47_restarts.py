"""Day-2 changes that restart Consul agents, under traffic (lab/traffic.py), rolled out with the
README's command, `salt '*' state.apply apigee_mtls`: a non-reloadable agent setting and a
Consul binary change. Servers restart one at a time after a health check, the leader last;
clients keep their sidecars; what failed is counted."""
import copy
import hashlib
import os
import shlex
import time

from conftest import labctl, state_summary, under_traffic

CONFIG_STATE = ("apigee_mtls_|-apigee-mtls-config-agent-file-managed_|-"
                "/etc/consul.d/consul.json_|-agent_config_managed")
CURRENT_STATE = "apigee_mtls_|-apigee-mtls-service-current_|-consul_|-agent_current"
START = "systemctl show -p ExecMainStartTimestampMonotonic --value consul"
#: the share of new connections a restart of every agent may fail through Consul 1.8's
#: built-in proxy (README, "Restarts"): a lookup in flight on a server when it stops fails,
#: because Consul 1.8.7 retries a dropped RPC only when its error is a bare EOF, and
#: "rpc error making call: EOF" is not; on a loaded host, a SYN held past the caller's
#: retries times out. Measured (README, "What still fails"): 0-3 of 3,504-8,982 per run
#: without extra load; before the servers' RPC hold up to 1.5 % failed, and with every agent
#: restarting at once, 24 %.
MAX_FAILED = 0.001


def _starts(lab):
    return {n: int(lab.run(n, START).stdout.strip() or 0) for n in lab.nodes}


def _proxy_pids(lab, node):
    out = lab.run(node, "systemctl show -p MainPID --value 'apigee-mtls-proxy@*'").stdout
    return sorted(out.split())


#: a sidecar refused by its local agent (a watch, or a handshake's authorize)
AGENT_REFUSED = "127.0.0.1:8500: connect: connection refused"
#: a sidecar that failed a connection: why a caller was reset
SIDECAR_FAILED = "failed to dial|connection failed"


def _sidecar_log(lab, since, pattern):
    """Per node, the list of the sidecars' journal lines since ``since`` (epoch seconds) that
    match the extended regular expression ``pattern``."""
    cmd = (f"journalctl --no-pager -q -o cat --since @{int(since)} -u 'apigee-mtls-proxy@*' "
           f"| grep -E {shlex.quote(pattern)}")
    return {n: lab.run(n, cmd, check=False).stdout.splitlines() for n in lab.nodes}


def _assert_rolled(lab, ret, report, since):
    """Servers one at a time (their stop-to-healthy windows never overlap), the leader last;
    the traffic: not one new connection failed, not one long-lived connection broke (new
    connections are held while an agent restarts, not refused); no sidecar was refused by
    its restarting agent (its asks are held too: an inbound handshake under way when the
    agent stopped authorizes once it is back)."""
    restarts = {n: ret[n][CURRENT_STATE]["changes"]["restarted"] for n in lab.nodes}
    servers = [n for n in lab.nodes if restarts[n]["server"]]
    assert servers and all("lock_wait" in restarts[n]["seconds"] for n in servers), restarts
    tot = report["totals"]
    assert tot["new_ok"] > 300 and tot["long_ok"] > 30 and not tot["missing_reports"], tot
    errors = {n: [line[:240] for line in lines[-5:]]
              for n, lines in _sidecar_log(lab, since, SIDECAR_FAILED).items() if lines}
    print("sidecars' failed connections:", errors)
    # Consul 1.8's built-in proxy asks its local agent for every new connection: while an
    # agent restarts they are held (SYN dropped, TCP resends it), and while a server is down
    # so are other agents' RPCs to it (Consul 1.8 does not retry a refused one). Measured on
    # the 5-node lab before the RPC hold: 2 to 35 of ~2,800 failed; all agents restarting at
    # once, as before issue 16: 518 of 2,156 (24 %). Not one long-lived connection breaks.
    assert tot["long_broken"] == 0, tot
    assert tot["new_failed"] <= MAX_FAILED * (tot["new_ok"] + tot["new_failed"]), (tot, errors)
    # a held connection completes late, not never: TCP resends a dropped SYN 1, 2, 3 and 4 s
    # after the first (tcp_syn_linear_timeouts, kernel 6.x; 1, 3, 7 s before); the hold is released once the agent authorizes again (2-3.5 s measured)
    assert tot["slowest_new"] < 10.0, tot
    # a leader at every sample but for the elections, at most one per server restart (the
    # leader restarts last: one, in practice); samples of an agent that was itself
    # restarting (no answer) are counted apart, in agent_down_samples
    assert tot["leader_changes"] <= len(servers), tot
    assert tot["no_leader_samples"] <= 3 * len(lab.nodes) * max(1, tot["leader_changes"]), tot
    # before the agent's own hold, every restarted node's sidecars logged refusals (their
    # watches; a handshake's authorize the same way reset its caller)
    refusals = {n: len(lines) for n, lines in _sidecar_log(lab, since, AGENT_REFUSED).items()}
    assert refusals == {n: 0 for n in lab.nodes}
    return restarts


def test_non_reloadable_change_restarts_servers_one_at_a_time(mesh):
    """consul:dns_exposed moves the DNS listener (addresses.dns): every agent must restart.
    The preview says "would restart"; the run restarts every agent, the servers one after
    another (never two down at once), the leader last; no sidecar restarts; under traffic
    nothing fails, and a leader exists at every sample but for at most one election per
    server restart."""
    lab = mesh
    pillar = copy.deepcopy(lab.pillar)
    pillar.setdefault("consul", {})["dns_exposed"] = True
    labctl.write_pillar(pillar)
    try:
        preview = lab.apply("*", "apigee_mtls", "test=True")
        for node in lab.nodes:
            cfg = preview[node][CONFIG_STATE]
            assert cfg["result"] is None and "would restart" in cfg["comment"], cfg
        before = _starts(lab)
        proxies = {n: _proxy_pids(lab, n) for n in lab.nodes}
        t0, since = time.monotonic(), time.time()
        ret, tot = under_traffic(lab, "non-reloadable agent setting (consul:dns_exposed)",
                                 lab.apply)
        report = {"totals": tot}
        summary = state_summary(ret)
        after = _starts(lab)
        print("agents restarted at (s from the apply):",
              {n: round(after[n] / 1e6 - t0, 1) for n in lab.nodes})
        print("restarts:", {n: ret[n][CURRENT_STATE]["changes"] for n in lab.nodes})
        assert not {n: s["failed"] for n, s in summary.items() if s["failed"]}, summary
        assert all(after[n] > before[n] for n in lab.nodes), (before, after)
        assert {n: _proxy_pids(lab, n) for n in lab.nodes} == proxies, "a sidecar restarted"
        _assert_rolled(lab, ret, report, since)
    finally:
        labctl.write_pillar(lab.pillar)
        restored = state_summary(lab.apply())
        assert all(not s["failed"] for s in restored.values()), restored
    lab.wait_mesh_ready()


def _exe_sha(lab, node):
    return lab.run(node, "sha256sum /proc/$(systemctl show -p MainPID --value consul)/exe"
                   ).stdout.split()[0]


def test_binary_change_is_a_rolling_upgrade(mesh):
    """A new consul:install source and hash (a byte-different copy of 1.8.7: a Go binary
    runs with bytes appended) is how operators upgrade Consul. The preview names every agent
    it would restart; the run restarts the servers one at a time, the leader last, then the
    clients (each client waits until every server runs the new binary); every agent then
    runs it; under traffic, not one connection fails."""
    lab = mesh
    files = os.path.join(labctl.STATE, "files", "consul")
    src = os.path.join(files, "consul")
    new = os.path.join(files, "consul-next")
    with open(src, "rb") as fh:
        data = fh.read() + b"\0apigee-mtls rolling upgrade test\n"
    with open(new, "wb") as fh:
        fh.write(data)
    os.chmod(new, 0o755)
    sha = hashlib.sha256(data).hexdigest()
    old = {n: _exe_sha(lab, n) for n in lab.nodes}
    assert sha not in old.values()
    labctl.write_pillar(lab.pillar, sha=sha, source="salt://consul/consul-next")
    try:
        preview = lab.apply("*", "apigee_mtls", "test=True")
        for node in lab.nodes:
            cur = preview[node][CURRENT_STATE]
            assert cur["result"] is None and "binary" in cur["changes"]["restarted"]["because"]
        since = time.time()
        ret, tot = under_traffic(lab, "Consul binary change (rolling upgrade)", lab.apply)
        report = {"totals": tot}
        summary = state_summary(ret)
        print("restarts:", {n: ret[n][CURRENT_STATE]["changes"] for n in lab.nodes})
        assert not {n: s["failed"] for n, s in summary.items() if s["failed"]}, summary
        assert {n: _exe_sha(lab, n) for n in lab.nodes} == {n: sha for n in lab.nodes}
        restarts = _assert_rolled(lab, ret, report, since)
        starts = _starts(lab)
        servers = [n for n in lab.nodes if restarts[n]["server"]]
        clients = [n for n in lab.nodes if not restarts[n]["server"]]
        assert min(starts[c] for c in clients) > max(starts[s] for s in servers), starts
    finally:
        labctl.write_pillar(lab.pillar)
        restored = state_summary(lab.apply())
        assert all(not s["failed"] for s in restored.values()), restored
    assert {n: _exe_sha(lab, n) for n in lab.nodes} == old
    lab.wait_mesh_ready()
