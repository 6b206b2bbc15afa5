"""
Envoy as the sidecars' data plane (``proxy:data_plane: envoy``, ``docs/design-envoy.md``):
the node's listeners and clusters, rendered from its plan (pure functions, no Salt, no
Consul, no Envoy).

Consul 1.8 serves Envoy the v2 xDS API only; the Envoy builds available today (1.36+) speak
v3 only. The formula therefore renders Envoy's resources itself, from what the planner already
knows: each ingress service's public listener and local component, each upstream's
destination node and ingress port (the same cluster-unique port as its local bind port), the
egress identity, and who may reach whom (:func:`apigee_mtls_plan.intentions`). Only the trust
domain (the Connect CA's, ``<cluster id>.consul``) comes from Consul at apply time.

What Envoy does here that Consul 1.8's built-in proxy cannot:

- ``tcp_proxy`` propagates a half-close (ZooKeeper's four-letter words: ``echo ruok | nc``);
- the ingress retries its dial to the local component (``max_connect_attempts`` with
  ``backoff_options``), so that a ZooKeeper follower dialling a new leader's 2888 a few ms
  before the leader listens waits for it instead of failing its registration.
"""
import re

#: the ingress's retries of its local dial: 40 attempts, 25 ms to 250 ms apart (about 10 s,
#: longer than a ZooKeeper leader takes to open its quorum port after its election)
INGRESS_RETRY = {"max_connect_attempts": 40,
                 "backoff_options": {"base_interval": "0.025s", "max_interval": "0.25s"}}
#: an egress's connect timeout: the ingress finishes its TLS handshake only once its own
#: dial succeeds, so this must outlast :data:`INGRESS_RETRY`'s window
EGRESS_CONNECT_TIMEOUT = "15s"
#: a component on the local loopback answers at once, or is down
LOCAL_CONNECT_TIMEOUT = "1s"

_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
_TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
_RBAC = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"


def spiffe_id(trust_domain, datacenter, service):
    """
    The SPIFFE ID Consul's Connect CA puts in ``service``'s leaf certificates.

    :param str trust_domain: the CA's trust domain (``<cluster id>.consul``:
        ``/v1/agent/connect/ca/roots``' ``TrustDomain``)
    :param str datacenter: the service's data center
    :param str service: the service name (an ingress service or an egress identity)
    :return: ``spiffe://<trust domain>/ns/default/dc/<dc>/svc/<service>`` (str)

    .. code-block:: python

        >>> spiffe_id("11111111-2222-3333-4444-555555555555.consul", "dc-1", "egress-qpid-pg")
        'spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc-1/svc/egress-qpid-pg'
    """
    return f"spiffe://{trust_domain}/ns/default/dc/{datacenter}/svc/{service}"


def source_matcher(trust_domain, source):
    r"""
    An Envoy string matcher for the SPIFFE ID of ``source`` in any data center (Consul 1.8's
    intentions name services, not data centers: a dc-2 node of an allowed role is allowed).

    :param str trust_domain: the Connect CA's trust domain (shared by federated DCs)
    :param str source: an egress identity
    :return: ``{"safe_regex": {"regex": ...}}`` (RE2, anchored)

    .. code-block:: python

        >>> source_matcher("a.consul", "egress-rt")["safe_regex"]["regex"]
        '^spiffe://a\\.consul/ns/default/dc/[^/]+/svc/egress\\-rt$'
    """
    return {"safe_regex": {"regex": "^spiffe://{}/ns/default/dc/[^/]+/svc/{}$".format(
        re.escape(trust_domain), re.escape(source))}}


def allowed_sources(intentions, service):
    """
    The egress identities allowed to reach ``service`` (Consul's default-deny intentions:
    only explicit allows count; ``*`` sources are not rendered by the planner).

    :param list intentions: :func:`apigee_mtls_plan.intentions`' list of dicts
    :param str service: an ingress service name
    :return: the source identities, sorted (list of str)

    .. code-block:: python

        >>> allowed_sources([{"source": "*", "destination": "*", "action": "deny"},
        ...                  {"source": "egress-rt-mp", "destination": "ms-8080-10-77-0-11",
        ...                   "action": "allow"}], "ms-8080-10-77-0-11")
        ['egress-rt-mp']
    """
    return sorted({i["source"] for i in intentions
                   if i["destination"] == service and i["action"] == "allow"
                   and i["source"] != "*"})


def _address(ip, port):
    return {"socket_address": {"address": ip, "port_value": int(port)}}


#: the name of the SDS secret holding the Connect CA roots (every TLS context validates with it)
ROOTS = "roots"


def _sds(certs_dir, name):
    """A reference to the SDS secret ``name``, served from the file ``<certs_dir>/<name>.json``
    (:func:`secrets`), which Envoy reloads when the directory changes (the formula replaces
    files by renaming: a renewed leaf needs no restart)."""
    return {"name": name, "sds_config": {"resource_api_version": "V3", "path_config_source": {
        "path": f"{certs_dir}/{name}.json", "watched_directory": {"path": certs_dir}}}}


def secrets(certs_dir, names):
    """
    The SDS documents of a node's Envoy: one per leaf certificate (``names``: its ingress
    services and its egress identity, each read from ``<name>.pem`` and ``<name>-key.pem``)
    and :data:`ROOTS` (``roots.pem``).

    :param str certs_dir: where the PEM files are (and these documents go)
    :param list names: the leaf certificates' names
    :return: ``{file name: document}``: ``<name>.json`` each, ``roots.json``
    """
    docs = {}
    for name in names:
        docs[f"{name}.json"] = {"resources": [{
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            "name": name, "tls_certificate": {
                "certificate_chain": {"filename": f"{certs_dir}/{name}.pem"},
                "private_key": {"filename": f"{certs_dir}/{name}-key.pem"}}}]}
    docs[f"{ROOTS}.json"] = {"resources": [{
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        "name": ROOTS, "validation_context": {
            "trusted_ca": {"filename": f"{certs_dir}/{ROOTS}.pem"}}}]}
    return docs


def _tcp_proxy(stat_prefix, cluster, retry=None):
    config = {"@type": _TCP_PROXY, "stat_prefix": stat_prefix, "cluster": cluster,
              # long-lived peer connections (ZooKeeper, Cassandra, replication) may be quiet
              # for long: no idle timeout, as Consul's built-in proxy
              "idle_timeout": "0s"}
    config.update(retry or {})
    return {"name": "envoy.filters.network.tcp_proxy", "typed_config": config}


def _static_cluster(name, ip, port, connect_timeout, transport_socket=None):
    cluster = {"name": name, "type": "STATIC", "connect_timeout": connect_timeout,
               "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                   {"endpoint": {"address": _address(ip, port)}}]}]}}
    if transport_socket:
        cluster["transport_socket"] = transport_socket
    return cluster


def ingress_resources(service, sources, trust_domain, certs_dir):
    """
    The public listener of an ingress service and the cluster of its local component.

    :param dict service: one of the plan's ``services`` (``name``, and
        ``connect.sidecar_service``: ``address``, ``port``, ``proxy.local_service_address``,
        ``proxy.local_service_port``)
    :param list sources: the egress identities allowed in (:func:`allowed_sources`); none
        renders a listener that refuses every connection
    :param str trust_domain: the Connect CA's trust domain
    :param str certs_dir: the directory of the SDS documents (:func:`secrets`)
    :return: ``(listener, cluster)`` (dicts, Envoy v3)
    """
    name = service["name"]
    side = service["connect"]["sidecar_service"]
    local = f"local-{name}"
    tls = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": _TLS + "DownstreamTlsContext", "require_client_certificate": True,
        "common_tls_context": {
            "tls_certificate_sds_secret_configs": [_sds(certs_dir, name)],
            "validation_context_sds_secret_config": _sds(certs_dir, ROOTS)}}}
    principals = [{"authenticated": {"principal_name": source_matcher(trust_domain, source)}}
                  for source in sources]
    rules = {"action": "ALLOW", "policies": {}}
    if principals:
        rules["policies"]["intentions"] = {"permissions": [{"any": True}],
                                           "principals": principals}
    rbac = {"name": "envoy.filters.network.rbac",
            "typed_config": {"@type": _RBAC, "stat_prefix": f"rbac-{name}", "rules": rules}}
    listener = {"name": f"ingress-{name}",
                "address": _address(side["address"], side["port"]),
                "filter_chains": [{"transport_socket": tls, "filters": [
                    rbac, _tcp_proxy(f"ingress-{name}", local, INGRESS_RETRY)]}]}
    cluster = _static_cluster(local, side["proxy"]["local_service_address"],
                              side["proxy"]["local_service_port"], LOCAL_CONNECT_TIMEOUT)
    return listener, cluster


def egress_resources(upstream, identity, trust_domain, certs_dir):
    """
    The listener of one upstream (on the identity's loopback address and the upstream's
    port, where the nat rules send the component's connections) and its cluster: the
    destination node's ingress listener, over mTLS as ``identity``, checking the
    destination service's SPIFFE ID.

    :param dict upstream: one of the plan's ``upstreams`` (``service``, ``ip``,
        ``datacenter``, ``proxy_port``, ``local_bind_address``); the destination's ingress
        listens on the same cluster-unique port at its node's IP
    :param str identity: the node's egress identity (its certificate: ``<identity>.pem``)
    :param str trust_domain: the Connect CA's trust domain
    :param str certs_dir: as in :func:`ingress_resources`
    :return: ``(listener, cluster)`` (dicts, Envoy v3)
    """
    name = upstream["service"]
    tls = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": _TLS + "UpstreamTlsContext", "sni": name,
        "common_tls_context": {
            "tls_certificate_sds_secret_configs": [_sds(certs_dir, identity)],
            "combined_validation_context": {
                "default_validation_context": {"match_typed_subject_alt_names": [{
                    "san_type": "URI", "matcher": {
                        "exact": spiffe_id(trust_domain, upstream["datacenter"], name)}}]},
                "validation_context_sds_secret_config": _sds(certs_dir, ROOTS)}}}}
    listener = {"name": f"upstream-{name}",
                "address": _address(upstream["local_bind_address"], upstream["proxy_port"]),
                "filter_chains": [{"filters": [_tcp_proxy(f"upstream-{name}", name)]}]}
    cluster = _static_cluster(name, upstream["ip"], upstream["proxy_port"],
                              EGRESS_CONNECT_TIMEOUT, tls)
    return listener, cluster


def resources(plan, intentions, trust_domain, certs_dir):
    """
    Every listener and cluster of a node's Envoy: its ingress services' and its upstreams'.

    :param dict plan: :func:`apigee_mtls_plan.plan` of the node
    :param list intentions: :func:`apigee_mtls_plan.intentions` of the same pillar
    :param str trust_domain: the Connect CA's trust domain
    :param str certs_dir: where the leaf certificates, keys and ``roots.pem`` are
    :return: ``{"listeners": [...], "clusters": [...]}``: the ingress services' in the
        plan's order, then the upstreams'
    :raises KeyError: for a plan without ``services``, ``upstreams`` or ``egress``

    .. code-block:: python

        out = resources(plan(pillar, "n4"), intentions(pillar), "<id>.consul",
                        "/etc/apigee-mtls/envoy/certs")
    """
    listeners, clusters = [], []
    for service in plan["services"]:
        listener, cluster = ingress_resources(
            service, allowed_sources(intentions, service["name"]), trust_domain, certs_dir)
        listeners.append(listener)
        clusters.append(cluster)
    identity = plan["egress"]["identity"]
    for upstream in plan["upstreams"]:
        listener, cluster = egress_resources(upstream, identity, trust_domain, certs_dir)
        listeners.append(listener)
        clusters.append(cluster)
    return {"listeners": listeners, "clusters": clusters}


_LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
_CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


def documents(out):
    """
    :func:`resources`' listeners and clusters as the files Envoy watches
    (:func:`bootstrap`): ``{"lds.json": ..., "cds.json": ...}``, each ``{"resources":
    [...]}`` with every resource's ``@type``.

    :param dict out: :func:`resources`' return
    :return: dict of file name to document
    """
    return {"lds.json": {"resources": [dict(listener, **{"@type": _LISTENER})
                                       for listener in out["listeners"]]},
            "cds.json": {"resources": [dict(cluster, **{"@type": _CLUSTER})
                                       for cluster in out["clusters"]]}}


def bootstrap(node_id, cluster, config_dir, admin_port=19000):
    """
    Envoy's bootstrap for a node: listeners and clusters from ``<config_dir>/lds.json`` and
    ``cds.json``, reloaded by Envoy when the formula replaces them (by renaming: a pillar
    change adds, changes and removes listeners without a restart; a listener whose
    definition did not change keeps its connections); the admin interface on loopback only.

    :param str node_id: the Envoy node ID (the Consul node name)
    :param str cluster: the Envoy cluster name (the egress identity)
    :param str config_dir: where ``lds.json`` and ``cds.json`` are
    :param int admin_port: the admin interface's port on 127.0.0.1
    :return: the bootstrap (dict, Envoy v3)

    .. code-block:: python

        >>> bootstrap("n4", "egress-qpid-pg", "/etc/apigee-mtls/envoy")["admin"]["address"]
        {'socket_address': {'address': '127.0.0.1', 'port_value': 19000}}
    """
    def source(name):
        return {"resource_api_version": "V3", "path_config_source": {
            "path": f"{config_dir}/{name}", "watched_directory": {"path": config_dir}}}
    return {"node": {"id": node_id, "cluster": cluster},
            "admin": {"address": _address("127.0.0.1", admin_port)},
            "dynamic_resources": {"lds_config": source("lds.json"),
                                  "cds_config": source("cds.json")}}
