"""
Rules for restarting Consul agents without an outage (pure functions, no Salt, no Consul).

A change Consul cannot reload (ports, addresses, ``server``, the binary) restarts the agent.
Two things keep that invisible to Apigee:

- **Servers restart one at a time, the leader last.** Every server that needs a restart takes
  a Consul lock (a KV key acquired with a session, :data:`LOCK_KEY`) and holds it until it is
  back in raft. Before its restart the cluster must be able to lose it: a leader, every
  server in the raft configuration and passing its health check. A server that needs a
  restart also holds a ``pending`` key; the leader waits while another server's pending key
  exists, so that it restarts last and the cluster elects at most once.
- **A client restarts between server restarts, never during one.** A Consul 1.8 server
  starts in legacy ACL mode; a client whose first token lookup meets it keeps the failure
  for the token's TTL (:func:`servers_unsettled`). A client that needs a restart holds
  ``<CLIENTS_PREFIX><node>`` while it restarts, taken only when no server holds or waits for
  the lock and every server is settled (:func:`client_waits`); a server that holds the lock
  waits until no client key exists. Each takes its own key before it reads the other's
  (Dekker's order, on Consul's linearizable KV), so one of the two always sees the other.
- **New inbound connections are held, not refused.** While an agent restarts, its sidecars
  cannot authorize a new inbound connection (Consul 1.8's built-in proxy asks the local agent
  for every one). For that time the node drops the SYNs to its sidecars' ports
  (:func:`hold_rules`); the callers' TCP retransmits them after 1 s, by when the agent answers.
  A sidecar whose TLS handshake was under way when the agent stopped asks it anyway: its
  new connections to the agent's HTTP port are held too (:func:`agent_hold_rules`), so that
  the ask waits for the restarted agent instead of being refused.

The serf failure detector does not notice a restart this short: ``leave_on_terminate`` is
false, so a restarted agent does not leave the cluster and its services stay in the catalog.
"""

import hashlib
import re

#: KV prefix of the formula's coordination keys (per data center: Consul's KV is not
#: replicated across data centers, and so neither are these locks)
KV_PREFIX = "apigee_mtls/"
#: the key whose holder restarts (one server of the data center at a time)
LOCK_KEY = KV_PREFIX + "restart/lock"
#: a server that needs a restart holds ``<PENDING_PREFIX><node>`` until it is done
PENDING_PREFIX = KV_PREFIX + "restart/pending/"
#: each server records the sha256 of the Consul binary it runs and the fingerprint of its
#: running state (:func:`agent_state`): clients restart onto a new binary once the servers of
#: their data center run it; the leader restarts once the others run what it will
BINARY_PREFIX = KV_PREFIX + "binary/"
#: a client agent holds ``<CLIENTS_PREFIX><node>`` while it restarts
CLIENTS_PREFIX = KV_PREFIX + "restart/clients/"
#: the comment that marks the hold rules in INPUT (and the agent's, in OUTPUT)
HOLD_COMMENT = "apigee-mtls-hold"
MULTIPORT_MAX = 15


def kv_keys():
    """The coordination keys (a function: Salt's ``__utils__`` holds functions only):
    ``{"lock": ..., "pending": <prefix>, "binary": <prefix>, "clients": <prefix>}``."""
    return {"lock": LOCK_KEY, "pending": PENDING_PREFIX, "binary": BINARY_PREFIX,
            "clients": CLIENTS_PREFIX}


def hold_rules(ports, allow_from=()):
    """
    The iptables rules (filter table, inserted first in INPUT) that drop new TCP connections
    (SYN) to ``ports`` while the local agent restarts. A dropped SYN is sent again by the
    caller's TCP stack after 1 s (then 2 s more), so callers wait instead of failing.

    :param ports: the node's sidecar public ports, upstream listeners and, on a server, its
        server RPC port (ints)
    :param allow_from: addresses whose SYNs still pass (a server's raft peers: the restarted
        server must hear from its leader to catch up while the other agents wait); inserted
        in the given order, the ACCEPT rules come after the DROP in the list, so that
        inserting each first in INPUT puts them above it
    :return: rule specifications without the chain, e.g. ``-p tcp -m tcp --syn -m multiport
        --dports 10300,10301 -m comment --comment apigee-mtls-hold -j DROP`` (list of str);
        empty when there is no port

    .. code-block:: python

        >>> hold_rules([10300])[0].split(" -m comment")[0]
        '-p tcp -m tcp --syn -m multiport --dports 10300'
    """
    ports = sorted(set(int(p) for p in ports))
    chunks = [ports[i:i + MULTIPORT_MAX] for i in range(0, len(ports), MULTIPORT_MAX)]
    rules = ["-p tcp -m tcp --syn -m multiport --dports {} -m comment --comment {} -j "
             "DROP".format(",".join(str(p) for p in chunk), HOLD_COMMENT) for chunk in chunks]
    for address in allow_from if rules else ():
        rules += ["-s {}/32 -p tcp -m tcp --syn -m multiport --dports {} -m comment --comment "
                  "{} -j ACCEPT".format(address, ",".join(str(p) for p in chunk), HOLD_COMMENT)
                  for chunk in chunks]
    return rules


def agent_hold_rules(http_port, user):
    """
    The iptables rule (filter table, inserted first in OUTPUT once the drain before the stop
    is done) that drops the sidecars' new connections (SYN) to the local agent's HTTP API
    while the agent restarts. The drain (:func:`pending_connections`) cannot see an inbound
    TLS handshake that waits for its caller's certificate (nothing unread): when the
    certificate comes after the agent stopped, the sidecar's authorize is refused and its
    caller sees a reset. Held, the sidecar's TCP sends its SYN again after 1 s and reaches
    the restarted agent; the rule goes with the sidecars' ports' hold, once the agent
    authorizes again. Only the sidecars' user is matched: Salt (root) keeps asking the
    agent whether it is back.

    :param int http_port: the agent's HTTP port on 127.0.0.1 (8500)
    :param str user: the sidecars' user (``proxy:user``, ``consul`` by default)
    :return: rule specifications without the chain (list of str), e.g. ``-d 127.0.0.1/32
        -o lo -p tcp -m tcp --syn --dport 8500 -m owner --uid-owner consul -m comment
        --comment apigee-mtls-hold -j DROP``

    .. code-block:: python

        >>> agent_hold_rules(8500, "consul")[0].split(" -m comment")[0]
        '-d 127.0.0.1/32 -o lo -p tcp -m tcp --syn --dport 8500 -m owner --uid-owner consul'
    """
    return ["-d 127.0.0.1/32 -o lo -p tcp -m tcp --syn --dport {} -m owner --uid-owner {} "
            "-m comment --comment {} -j DROP".format(int(http_port), user, HOLD_COMMENT)]


def caught_up(raft):
    """
    Whether a Consul server's state has caught up with its leader's, from the ``raft`` stats
    of ``/v1/agent/self`` (strings): it has heard from a leader, and it has applied every
    entry its leader told it is committed. A restarted server restores its last snapshot and
    applies the entries after it only once it hears from its leader; meanwhile it answers
    stale reads (Consul 1.8's proxies resolve upstreams with stale reads) from old state:
    "no healthy instances found".

    :param dict raft: ``Stats.raft`` of ``/v1/agent/self``
    :return: bool

    .. code-block:: python

        >>> caught_up({"state": "Follower", "last_contact": "4.2ms", "commit_index": "870",
        ...            "applied_index": "870"})
        True
        >>> caught_up({"state": "Follower", "last_contact": "never", "commit_index": "0",
        ...            "applied_index": "861"})
        False
    """
    try:
        commit, applied = int(raft.get("commit_index", 0)), int(raft.get("applied_index", 0))
    except (TypeError, ValueError):
        return False
    if raft.get("state") == "Leader":
        return applied >= commit > 0
    return (raft.get("state") == "Follower" and raft.get("last_contact") not in (None, "never")
            and applied >= commit > 0)


#: an established connection that has received no more data segments than this is still in
#: its TLS handshake (a ClientHello, then the client's certificate flight); a long-lived one,
#: even a quiet one, has received more
HANDSHAKE_SEGMENTS = 3


def pending_connections(ss_text, ports):
    """
    The connections to ``ports`` that a sidecar has not finished with, from ``ss -Htina``:
    still in the TCP handshake (``SYN-RECV``), waiting to be accepted (a listening socket's
    Recv-Q is its accept queue), or new and holding bytes the sidecar has not read yet
    (Recv-Q > 0 after at most :data:`HANDSHAKE_SEGMENTS` data segments: a TLS ClientHello or
    client certificate, so the handshake, and the authorize call the sidecar makes to its
    agent for it, are still to come). An agent must not stop while any exists: that sidecar's
    authorize would fail and its caller see a reset. Established connections carrying
    traffic are not waited for.

    :param str ss_text: the output of ``ss -Htina`` (no header; per socket a line with state,
        Recv-Q, Send-Q, local address:port and peer address:port, then a tab-indented line of
        TCP information with ``data_segs_in:<n>``)
    :param ports: the held ports (ints)
    :return: the pending connections, as ``"STATE local peer"`` (list of str)

    .. code-block:: python

        >>> pending_connections("LISTEN 1 4096 0.0.0.0:10300 0.0.0.0:*\\n"
        ...                     "ESTAB 0 0 10.0.0.1:10300 10.0.0.2:4242", [10300])
        ['LISTEN 0.0.0.0:10300 0.0.0.0:*']
    """
    ports = {int(p) for p in ports}
    sockets = []
    for line in (ss_text or "").splitlines():
        if line[:1].isspace():
            if sockets:
                sockets[-1][1] = line
            continue
        sockets.append([line, ""])
    out = []
    for line, info in sockets:
        fields = line.split()
        if len(fields) < 5 or not fields[1].isdigit():
            continue
        state, recv_q, local, peer = fields[0], int(fields[1]), fields[3], fields[4]
        port = local.rsplit(":", 1)[-1]
        if not port.isdigit() or int(port) not in ports:
            continue
        segments = re.search(r"data_segs_in:(\d+)", info)
        new = int(segments.group(1)) <= HANDSHAKE_SEGMENTS if segments else True
        if state == "SYN-RECV" or (state == "LISTEN" and recv_q > 0) or (
                state == "ESTAB" and recv_q > 0 and new):
            out.append("{} {} {}".format(state, local, peer))
    return out


def sidecar_ports(services):
    """The public ports of the sidecars among a plan's ``services`` (sorted ints)."""
    return sorted({s["connect"]["sidecar_service"]["port"] for s in services
                   if (s.get("connect") or {}).get("sidecar_service")})


def cluster_can_lose_a_server(leader, peers, passing, expected):
    """
    Whether the data center's Consul servers can lose one of them for a restart without
    losing their quorum: a leader exists, the raft configuration holds every expected server,
    and every one of them passes its serf health check. Built from what a node's own token
    may read (``/v1/status/leader``, ``/v1/status/peers``, ``/v1/health/service/consul``):
    autopilot's and raft's operator endpoints would need ``operator = "read"``, which also
    reads the Connect CA configuration, the organisation CA's private key included.

    :param str leader: ``GET /v1/status/leader`` (``"10.0.0.1:8300"``, or ``""``)
    :param list peers: ``GET /v1/status/peers`` (``["10.0.0.1:8300", ...]``)
    :param list passing: the addresses of the servers whose ``consul`` service passes
        (``GET /v1/health/service/consul?passing``)
    :param int expected: the number of servers the data center should have
    :return: None when it can, else the reason (str)

    .. code-block:: python

        >>> cluster_can_lose_a_server("10.0.0.1:8300", ["10.0.0.1:8300", "10.0.0.2:8300",
        ...                           "10.0.0.3:8300"], ["10.0.0.1", "10.0.0.2", "10.0.0.3"], 3)
    """
    if expected <= 1:
        return None  # a single server: there is no quorum to keep
    if not leader:
        return "no leader"
    hosts = sorted(p.rsplit(":", 1)[0] for p in peers or [])
    if len(hosts) < expected:
        return "raft holds {} of the {} servers".format(len(hosts), expected)
    down = [h for h in hosts if h not in set(passing or [])]
    if down:
        return "servers not passing their health check: " + ", ".join(down)
    if len(hosts) - 1 < len(hosts) // 2 + 1:
        return "losing one of {} servers would lose the quorum".format(len(hosts))
    return None


def raft_member_ready(raft_stats, max_contact=1.0):
    """
    Whether a restarted server is back in raft: it leads, or it follows and heard from the
    leader less than ``max_contact`` seconds ago. Autopilot alone cannot tell: a server back
    within a second or two may never have been seen unhealthy.

    :param dict raft_stats: ``Stats.raft`` of ``GET /v1/agent/self`` (values are strings:
        ``state``, ``last_contact`` such as ``"23.7ms"``, ``"1.2s"`` or ``"never"``)
    :param float max_contact: seconds
    :return: bool

    .. code-block:: python

        >>> raft_member_ready({"state": "Follower", "last_contact": "23.707065ms"})
        True
    """
    state = (raft_stats or {}).get("state")
    if state == "Leader":
        return True
    if state != "Follower":
        return False
    contact = str(raft_stats.get("last_contact", "never"))
    for unit, scale in (("ms", 0.001), ("µs", 1e-6), ("us", 1e-6), ("ns", 1e-9), ("s", 1.0)):
        if contact.endswith(unit):
            try:
                return float(contact[:-len(unit)]) * scale < max_contact
            except ValueError:
                return False
    return contact == "0"


def leader_waits(node, leader, pending, states, want):
    """
    Whether server ``node`` must wait before taking the restart lock: the leader restarts
    last, after every other server that holds a pending key and every other server whose
    recorded agent state (binary, configuration, unit) is not yet the one the leader is about
    to run. Servers apply at slightly different times: without the second rule, a leader
    that reaches its restart first would restart before followers that need one too, and the
    cluster would elect twice. The caller bounds the wait (``leader_wait``).

    :param str node: this server (Consul node name)
    :param str leader: the data center's leader (node name), or None when unknown
    :param pending: node names holding a pending key (this one may be among them)
    :param dict states: other server -> its recorded agent state fingerprint (or None)
    :param str want: the fingerprint of the state this server restarts into
    :return: bool

    .. code-block:: python

        >>> leader_waits("n1", "n1", ["n1", "n2"], {}, "x")
        True
        >>> leader_waits("n1", "n1", ["n1"], {"n2": "x", "n3": "old"}, "x")
        True
    """
    if node != leader:
        return False
    return (any(p != node for p in pending)
            or any(fp != want for other, fp in states.items() if other != node))


#: serf tag a Consul 1.8 server advertises for its ACL mode: "1" once it uses the ACL system
#: (a restarted server starts in legacy mode, "2", until it has seen its leader's mode)
ACL_MODE_ENABLED = "1"


def servers_unsettled(members, servers, acl_enabled=True):
    """
    The servers a client agent waits for before it restarts: those not alive in the LAN pool,
    or, with ACLs, not yet out of the legacy ACL mode a restarted Consul 1.8 server starts in.
    A client that restarts meanwhile and sends its first token lookup there gets "The ACL
    system is currently in legacy mode", and Consul keeps that failure for the token's TTL
    (30 s): the node's sidecars cannot authorize and its new connections time out (measured
    in the lab: 33 s).

    :param list members: ``GET /v1/agent/members`` (dicts with ``Name``, ``Status`` (1:
        alive) and ``Tags``)
    :param servers: the data center's server node names
    :param bool acl_enabled: whether the cluster runs ACLs
    :return: ``{server: why}`` for each unsettled server (dict; empty when all are settled)

    .. code-block:: python

        >>> servers_unsettled([{"Name": "n1", "Status": 1, "Tags": {"acls": "2"}}], ["n1"])
        {'n1': 'in legacy ACL mode (just restarted)'}
    """
    by_name = {m.get("Name"): m for m in members or []}
    out = {}
    for name in servers:
        member = by_name.get(name)
        if member is None or member.get("Status") != 1:
            out[name] = "not alive"
        elif acl_enabled and (member.get("Tags") or {}).get("acls") != ACL_MODE_ENABLED:
            out[name] = "in legacy ACL mode (just restarted)"
    return out


def client_waits(lock_holder, pending, unsettled, behind=()):
    """
    Why a client agent must not restart now (it has just taken its own ``clients`` key and
    gives it back when this is not None): a server holds the restart lock or waits for it,
    a server is not settled (:func:`servers_unsettled`), or, when the client restarts onto a
    new binary, a server still runs another one (:func:`clients_wait_for`).

    :param lock_holder: the session holding :data:`LOCK_KEY` (str), or None
    :param pending: the servers holding a ``pending`` key (list of str)
    :param dict unsettled: :func:`servers_unsettled`'s answer
    :param behind: :func:`clients_wait_for`'s answer (list of str; empty for no new binary)
    :return: the reason (str), or None when the client may restart

    .. code-block:: python

        >>> client_waits(None, ["n1"], {})
        'servers restart first: n1'
    """
    if behind:
        return "servers {} still run another binary; apply apigee_mtls on them first".format(
            ", ".join(sorted(behind)))
    if lock_holder or pending:
        return "servers restart first: {}".format(", ".join(sorted(pending)) or "lock held")
    if unsettled:
        return "servers not settled: " + ", ".join(
            "{} {}".format(name, why) for name, why in sorted(unsettled.items()))
    return None


def agent_state(binary_sha, config_bytes, unit_bytes):
    """A fingerprint of what an agent runs: its binary's sha256, its ``consul.json`` and its
    systemd unit (sha256 hex of the three)."""
    digest = hashlib.sha256(binary_sha.encode())
    for part in (config_bytes or b"", unit_bytes or b""):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def clients_wait_for(binary_sha, server_shas):
    """
    The servers a client waits for before it restarts onto the binary ``binary_sha``: those
    that recorded another binary. Servers that recorded nothing (a cluster made before the
    record existed) are not waited for.

    :param str binary_sha: sha256 (hex) of the client's new binary
    :param dict server_shas: server node name -> recorded sha256 (or None)
    :return: the names of the servers still on another binary (sorted list)
    """
    return sorted(n for n, sha in server_shas.items() if sha and sha != binary_sha)


def sha256_file(path):
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sidecar_listener_action(old, listener, upstreams, running):
    """
    Whether a running sidecar must restart for a new plan of its listeners, and the record
    to keep (a sidecar's listener file). Consul 1.8's built-in proxy binds its public
    listener once, at start; on a change of its registration it opens a listener for every
    upstream whose port is free and never closes one (a removed or moved upstream's old
    listener keeps serving its old destination until the proxy restarts). So a sidecar
    follows new and moved upstreams live, and must restart only when its public listener
    changes, or when an upstream's new port is still held, by this proxy, for another
    destination. The record keeps every port the running proxy holds (``bound``).

    :param old: the sidecar's record (dict: ``address``, ``port``,
        ``local_service_address``, ``local_service_port``, ``upstreams`` {destination:
        port}, ``bound`` {port (str): destination}), or None for a sidecar without one
    :param dict listener: the planned ``address``, ``port``, ``local_service_address``
        and ``local_service_port`` of its public listener
    :param dict upstreams: the planned {destination: local port}
    :param bool running: whether the sidecar runs now (one that does not binds the plan
        only when it starts)
    :return: ``{"restart": [why, ...] (empty: no restart), "record": the new record,
        "bind": [ports the running proxy opens live (sorted ints)]}``

    .. code-block:: python

        >>> old = {"port": 1, "upstreams": {"a": 10100, "b": 10101},
        ...        "bound": {"10100": "a", "10101": "b"}}
        >>> sidecar_listener_action(old, {"port": 1}, {"b": 10100}, True)["restart"]
        ['b: port 10100 is held for a']
        >>> sidecar_listener_action(old, {"port": 1}, {"b": 10102}, True)["bind"]
        [10102]
    """
    fresh = {str(port): dest for dest, port in upstreams.items()}
    record = dict(listener, upstreams=dict(upstreams))
    if old is None or not running:
        return {"restart": [], "record": dict(record, bound=fresh), "bind": []}
    restart = ["{} changed".format(key) for key in sorted(listener)
               if old.get(key) != listener[key]]
    bound = old.get("bound")
    if bound is None:  # a record from before ``bound``: the proxy holds its upstreams
        bound = {str(port): dest for dest, port in (old.get("upstreams") or {}).items()}
    for dest, port in sorted(upstreams.items()):
        holder = bound.get(str(port))
        if holder not in (None, dest):
            restart.append("{}: port {} is held for {}".format(dest, port, holder))
    if restart:
        return {"restart": restart, "record": dict(record, bound=fresh), "bind": []}
    bind = sorted(int(port) for port in fresh if port not in bound)
    return {"restart": [], "record": dict(record, bound=dict(bound, **fresh)), "bind": bind}


# ---------------------------------------------------------------------------------------------
# An egress identity change (the move to role identities, a node's new component set): the
# new proxy runs next to the old one; new connections move, open ones drain

#: the upstream listeners' address of the per-node egress proxies of earlier releases
LEGACY_BIND_ADDRESS = "127.0.0.1"


def draining_egress(services_doc, draining_doc, planned_id, active):
    """
    The previous egress instances of a node to keep registered while their proxies drain:
    every egress definition (``meta.apigee_mtls == "egress"``) of the services file and of
    the draining file whose ID is not the planned one and whose proxy still runs. Registered,
    it keeps its intentions (``apigee_mtls.intentions_managed`` keeps those of identities
    that still have instances).

    :param dict services_doc: the services file as it is on disk (``{"services": [...]}``),
        or None
    :param dict draining_doc: the draining file (same shape), or None
    :param str planned_id: the planned egress instance's ID
    :param active: IDs whose proxy unit (``apigee-mtls-proxy@<id>``) is active
    :return: the definitions (list, by ID, first copy of each), tokens kept as they were

    .. code-block:: python

        >>> old = {"id": "egress-10-77-0-11", "meta": {"apigee_mtls": "egress"}}
        >>> draining_egress({"services": [old]}, None, "egress-zk-10-77-0-11",
        ...                 {"egress-10-77-0-11"}) == [old]
        True
    """
    found = {}
    for doc in (services_doc, draining_doc):
        for svc in (doc or {}).get("services") or []:
            if not isinstance(svc, dict) or (svc.get("meta") or {}).get("apigee_mtls") != "egress":
                continue
            sid = svc.get("id")
            if sid and sid != planned_id and sid in set(active) and sid not in found:
                found[sid] = svc
    return [found[sid] for sid in sorted(found)]


def egress_listeners(record):
    """
    ``(address, ports)`` of an egress proxy's upstream listeners, from its listener record
    (``apigee_mtls.sidecar_listeners_managed``): every port the running proxy holds.

    :param dict record: the record (``local_bind_address`` is absent from the records of
        earlier releases: they bound :data:`LEGACY_BIND_ADDRESS`)
    :return: ``(str, sorted list of int)``
    """
    record = record or {}
    ports = {int(port) for port in (record.get("bound") or {})}
    ports |= {int(port) for port in (record.get("upstreams") or {}).values()}
    return record.get("local_bind_address") or LEGACY_BIND_ADDRESS, sorted(ports)


def egress_connections(record, sockets):
    """
    How many established connections an egress proxy still carries: sockets whose local end
    is one of its upstream listeners (:func:`egress_listeners`).

    :param dict record: its listener record
    :param list sockets: ``parse_ss_established`` output
    :return: int
    """
    address, ports = egress_listeners(record)
    ports = set(ports)
    return sum(1 for s in sockets if s["local_ip"] == address and s["local_port"] in ports)


def switch_refusals(new, old):
    """
    The upstreams that would fail if new connections moved to the new egress proxy now:
    refused through it while they work through the old one. An upstream that fails through
    both (its instance is down) is not the switch's doing.

    :param dict new: ``{destination: True/False}``: probes through the new proxy
    :param dict old: the same through the old proxy (missing: the old one has no listener
        for it, so nothing works today either)
    :return: sorted destinations
    """
    return sorted(dest for dest, ok in new.items() if not ok and old.get(dest))
