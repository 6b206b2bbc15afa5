"""
Execution module for the apigee_mtls formula.

Mostly thin wrappers around the pure planner (``_utils/apigee_mtls_plan.py``) that read the
``apigee_mtls`` pillar and this minion's id and hand back plain data:

- the pillar: :py:func:`validate`, :py:func:`plan`, :py:func:`intentions`,
  :py:func:`ports` (alias ``report``), :py:func:`rollout_stage`,
  :py:func:`management_token_file`, :py:func:`gossip_keygen`;
- the signer, answering other minions: :py:func:`sign_agent_certificate`,
  :py:func:`issue_acl_token`, and its CA files (:py:func:`ca_files`, :py:func:`ca_ready`);
- the requests to the signer, through Salt's event bus and the master's reactor:
  :py:func:`ask_signer` (a node), :py:func:`answer_request` (the signer),
  :py:func:`accept_answer` (the node again);
- the node, read only: :py:func:`firewall_status`, :py:func:`chain_drifted`,
  :py:func:`ipv6_skip_reason`, :py:func:`verify` (Consul, the chains, the mesh end to end),
  :py:func:`probe_upstream` (one upstream through the egress proxy).

Errors: bad input, a bad pillar included, raises ``CommandExecutionError`` with one line
(``apigee_mtls: invalid pillar: <key>: <what is wrong>``): the CLI exits non-zero, and a
template calling the function stops rendering with that line. The two functions that answer
other minions' requests return ``{"error": ...}`` dicts instead, which the requesting states
parse.
:py:func:`verify` returns its verdict and sets a non-zero exit code when a check fails.

Sync it to the minions before use (``state.apply`` does not sync custom modules):

.. code-block:: bash

    salt '*' saltutil.sync_all

:depends: cryptography (through Salt's ``x509_v2``), py-consul (:py:func:`verify`)
"""

import concurrent.futures
import ipaddress
import json
import logging
import os
import pwd
import re
import socket
import time
import uuid

from salt.exceptions import CommandExecutionError

try:
    import consul  # noqa: F401  (only whether it imports: verify needs it)

    HAS_CONSUL = True
except ImportError:  # pragma: no cover
    HAS_CONSUL = False

log = logging.getLogger(__name__)

__virtualname__ = "apigee_mtls"

PILLAR_KEY = "apigee_mtls"
ACL_PREFIX = "apigee-mtls"
CA_DIR = "/etc/apigee-mtls/ca"
#: the formula's iptables chains: table -> (chain, the built-in chain that jumps to it)
CHAINS = {"nat": ("APIGEE-MTLS-OUT", "OUTPUT"), "filter": ("APIGEE-MTLS-IN", "INPUT")}
#: the formula's ip6tables chains (filter table): status key -> (chain, parent, plan key)
CHAINS6 = {
    "ip6:APIGEE-MTLS-IN": ("APIGEE-MTLS-IN", "INPUT", "input"),
    "ip6:APIGEE-MTLS-OUT": ("APIGEE-MTLS-OUT", "OUTPUT", "output"),
}


def __virtual__():
    if "apigee_mtls_plan.normalize" not in __utils__:
        return (
            False,
            "apigee_mtls: the planner util is not loaded; run saltutil.sync_all",
        )
    return __virtualname__


def _pillar():
    # Salt 3008 masks pillar values outside of template rendering; the planner needs them
    return __salt__["pillar.get"](PILLAR_KEY, None, unmask=True)


def _error(exc):
    """The answer of a peer-published function (``sign_agent_certificate``,
    ``issue_acl_token``) to a bad pillar: the requesting state parses it."""
    return {"error": str(exc), "key": getattr(exc, "key", None)}


def _invalid(exc):
    """The one-line error of a bad pillar (a ``PillarError`` from the planner): the CLI
    exits non-zero with it, and a template calling the function stops rendering with it."""
    return CommandExecutionError(f"apigee_mtls: invalid pillar: {exc}")


def _model(data=None):
    """The planner's normalized model of ``data`` (default: this minion's pillar).

    :raises CommandExecutionError: the pillar is invalid
    """
    try:
        return __utils__["apigee_mtls_plan.normalize"](_pillar() if data is None else data)
    except ValueError as exc:
        raise _invalid(exc) from exc


def _check_bool(name, value, allow_none=False):
    if (value is None and allow_none) or isinstance(value, bool):
        return
    raise CommandExecutionError(f"{name}: expected True or False, got {value!r}")


def validate(pillar=None):
    """
    Validate the ``apigee_mtls`` pillar (or the given value) and return the normalized model
    (every default filled in, ports allocated), secrets masked as ``<hidden>``. Use it to check
    a pillar edit before applying it.

    :param dict pillar: the value of the ``apigee_mtls`` pillar key to check instead of this
        minion's pillar (default ``None``: this minion's)
    :return: the normalized model (dict)
    :raises CommandExecutionError: the pillar is invalid (``apigee_mtls: invalid pillar:
        <key>: <what is wrong>``, one line)

    CLI Example:

    .. code-block:: bash

        salt '*' apigee_mtls.validate
    """
    return _mask(_model(pillar))


def _mask(obj):
    if isinstance(obj, dict):
        return {
            k: ("<hidden>" if k in ("gossip_key", "secrets") and v else _mask(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [_mask(v) for v in obj]
    return obj


ROLLOUT_STAGES = ("agents", "mesh", "redirect", "full")


def rollout_stage():
    """
    The stage of a staged rollout this run belongs to: ``apigee_mtls_rollout:stage`` of the
    run's pillar (the orchestrate ``apigee_mtls.orch.rollout`` passes it inline), default
    ``full`` (a plain ``state.apply apigee_mtls``).

    - ``agents``: Consul agent only (install, tls, config, service);
    - ``mesh``: also the sidecars, intentions and keyring; no iptables rules;
    - ``redirect``: also the nat redirects and the member rules, but direct connections to
      the components are still accepted;
    - ``full``: everything, the meshed ports locked down to the sidecars.

    Takes no parameters.

    :return: one of ``agents``, ``mesh``, ``redirect``, ``full`` (str)
    :raises CommandExecutionError: ``apigee_mtls_rollout:stage`` is another value

    CLI Example:

    .. code-block:: bash

        salt-call apigee_mtls.rollout_stage pillar='{"apigee_mtls_rollout": {"stage": "mesh"}}'
    """
    stage = __salt__["pillar.get"]("apigee_mtls_rollout:stage", None, unmask=True) or "full"
    if stage not in ROLLOUT_STAGES:
        raise CommandExecutionError(f"apigee_mtls_rollout:stage: {stage!r} is not one of "
                                    f"{', '.join(ROLLOUT_STAGES)}")
    return stage


def plan(node_id=None, pillar=None, secrets=False, lockdown=None):
    """
    The full plan for one node: Consul agent config, services, sidecars, upstreams, firewall
    chains (and their ``iptables-restore`` payloads), certificate identity, ACL policy, plus the
    settings the SLS files need (``tls``, ``consul``, ``datacenters``, ``proxy``,
    ``firewall_settings``).

    :param str node_id: the minion id to plan for (default ``None``: this minion)
    :param dict pillar: the value of the ``apigee_mtls`` pillar key to plan from (default
        ``None``: this minion's pillar)
    :param bool secrets: ``True`` keeps the gossip key in ``encrypt_config`` (only the formula's
        own templates pass it: a job return lands in the job cache); default ``False``: hidden
    :param bool lockdown: ``True`` locks the meshed ports down to the sidecars, ``False`` gives
        the redirect stage's chains; default ``None``: ``True`` unless
        :py:func:`rollout_stage` says otherwise
    :return: the plan (dict, ``member: True``), or ``{"member": False, "node_id": ...}`` for a
        minion that is not in ``apigee_mtls:nodes``
    :raises CommandExecutionError: the pillar is invalid (``apigee_mtls: invalid pillar:
        <key>: <what is wrong>``, one line)
    :raises CommandExecutionError: ``node_id``, ``secrets`` or ``lockdown`` has the wrong type,
        or ``apigee_mtls_rollout:stage`` is unknown

    CLI Example:

    .. code-block:: bash

        salt-call apigee_mtls.plan --out=json
        salt n1 apigee_mtls.plan node_id=n4 lockdown=False
    """
    _check_bool("secrets", secrets)
    _check_bool("lockdown", lockdown, allow_none=True)
    if node_id is not None and not isinstance(node_id, str):
        raise CommandExecutionError(f"node_id: expected a minion id, got {node_id!r}")
    data = _pillar() if pillar is None else pillar
    node_id = node_id or __opts__["id"]
    model = _model(data)
    if node_id not in {n["id"] for n in model["nodes"]}:
        return {"member": False, "node_id": node_id}
    if lockdown is None:
        lockdown = rollout_stage() == "full"
    try:
        result = __utils__["apigee_mtls_plan.plan"](data, node_id, lockdown=lockdown)
    except ValueError as exc:
        raise _invalid(exc) from exc
    result["lockdown"] = lockdown
    result["member"] = True
    if not secrets and result.get("encrypt_config"):
        result["encrypt_config"] = {k: "<hidden>" if k == "encrypt" else v
                                    for k, v in result["encrypt_config"].items()}
    # settings the SLS files need besides the node's own plan
    for key in ("tls", "consul", "datacenters", "proxy"):
        result.setdefault(key, model.get(key))
    result["firewall_settings"] = model.get("firewall")
    result["iptables_restore"] = __utils__["apigee_mtls_plan.render_iptables_restore"](
        result["firewall"]
    )
    result["ip6tables_restore"] = __utils__["apigee_mtls_plan.render_ip6tables_restore"](
        result["firewall"]
    )
    return result


def intentions(pillar=None):
    """
    The intentions the cluster should have: ``* -> *`` deny first, then one allow per
    (egress identity, ingress service) that a node of that role reaches (its upstreams):
    ``egress-<role> -> <service on B>``, roles sorted, in a stable order. Their number grows
    linearly with the nodes.

    :param dict pillar: the value of the ``apigee_mtls`` pillar key (default ``None``: this
        minion's pillar)
    :return: ``[{"source", "destination", "action"}, ...]``
    :raises CommandExecutionError: the pillar is invalid (``apigee_mtls: invalid pillar:
        <key>: <what is wrong>``, one line)

    CLI Example:

    .. code-block:: bash

        salt-call apigee_mtls.intentions
    """
    data = _pillar() if pillar is None else pillar
    try:
        return __utils__["apigee_mtls_plan.intentions"](data)
    except ValueError as exc:
        raise _invalid(exc) from exc


def ports(pillar=None):
    """
    The port report: per node, the egress port, every ingress listener (service, component
    port, proxy port) and the upstreams, like the vendor's port report. ``report`` is the same
    function.

    :param dict pillar: the value of the ``apigee_mtls`` pillar key (default ``None``: this
        minion's pillar)
    :return: ``{node id: {"ip", "datacenter", "retired", "egress", "ingress", "upstreams"}}``
    :raises CommandExecutionError: the pillar is invalid (``apigee_mtls: invalid pillar:
        <key>: <what is wrong>``, one line)

    CLI Example:

    .. code-block:: bash

        salt-call apigee_mtls.ports
        salt-call apigee_mtls.report
    """
    data = _pillar() if pillar is None else pillar
    try:
        return __utils__["apigee_mtls_plan.port_report"](data)
    except ValueError as exc:
        raise _invalid(exc) from exc


report = ports


def gossip_keygen():
    """
    Generate a new gossip encryption key (32 random bytes, base64), for the operator to put
    in pillar as ``apigee_mtls:secrets:gossip_key``. The formula never generates or replaces
    the key by itself. Takes no parameters and raises nothing.

    :return: the key (str)

    CLI Example:

    .. code-block:: bash

        salt-call --local apigee_mtls.gossip_keygen
    """
    return __utils__["apigee_mtls_plan.gossip_keygen"]()


def _ca_file(generation, kind, ca_dir=None):
    """Path of a CA generation's ``cert`` or ``key`` on the signer."""
    names = __utils__["apigee_mtls_plan.ca_file_names"](generation)
    return os.path.join(ca_dir or CA_DIR, names[kind])


def ca_files(ca_dir=None):
    """
    The CA generations that have a certificate or key on this minion (the signer), ascending
    (paths given whether or not both files exist). The formula removes those the pillar no
    longer trusts (``tls:ca_generation``, ``tls:ca_trust``).

    :param str ca_dir: absolute path of the CA directory (default ``None``:
        ``/etc/apigee-mtls/ca``); a directory that does not exist yet holds no generation
    :return: ``[{"generation": N, "cert": path, "key": path}, ...]``
    :raises CommandExecutionError: ``ca_dir`` is not an absolute path, or exists but cannot
        be listed (not a directory, no permission)

    CLI Example:

    .. code-block:: bash

        salt n1 apigee_mtls.ca_files
    """
    if ca_dir is not None and not (isinstance(ca_dir, str) and os.path.isabs(ca_dir)):
        raise CommandExecutionError(f"ca_dir: expected an absolute path, got {ca_dir!r}")
    try:
        names = os.listdir(ca_dir or CA_DIR)
    except FileNotFoundError:
        return []  # the signer's first run: no CA yet
    except OSError as exc:
        raise CommandExecutionError(f"ca_dir: cannot list {ca_dir or CA_DIR}: {exc}") from exc
    gens = {__utils__["apigee_mtls_plan.ca_file_generation"](n) for n in names}
    return [{"generation": g, "cert": _ca_file(g, "cert", ca_dir),
             "key": _ca_file(g, "key", ca_dir)} for g in sorted(x for x in gens if x)]


def _missing_generations(generations):
    return [g for g in generations
            if not (os.path.isfile(_ca_file(g, "key")) and os.path.isfile(_ca_file(g, "cert")))]


def ca_ready(generations=None):
    """
    Whether this minion holds the key and certificate of every CA generation the pillar
    trusts (``tls:ca_generation`` and ``tls:ca_trust``; generation 1 is ``ca.pem`` and
    ``ca-key.pem``), or of the given generations.

    :param list generations: CA generations (integers from 1) to look for (default ``None``:
        those the pillar trusts)
    :return: bool
    :raises CommandExecutionError: the pillar is invalid (``apigee_mtls: invalid pillar:
        <key>: <what is wrong>``, one line)
    :raises CommandExecutionError: ``generations`` is not a list of integers from 1

    CLI Example:

    .. code-block:: bash

        salt n1 apigee_mtls.ca_ready
        salt n1 apigee_mtls.ca_ready '[1, 2]'
    """
    if generations is None:
        model = _model()
        generations = [model["tls"]["ca_generation"]] + model["tls"]["ca_trust"]
    if not isinstance(generations, (list, tuple)) or not all(
            isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in generations):
        raise CommandExecutionError(
            f"generations: expected a list of CA generations (integers from 1), got "
            f"{generations!r}")
    return not _missing_generations(generations)


def _ca_bundle(generations):
    """The trusted CA certificates, in the given order (the signing generation first)."""
    parts = []
    for gen in generations:
        with open(_ca_file(gen, "cert"), encoding="utf-8") as fh:
            pem = fh.read()
        parts.append(pem if pem.endswith("\n") else pem + "\n")
    return "".join(parts)


def _signer_request(kwargs, what):
    """``(requester, pillar, model, refusal)`` for a request answered by the signer: the
    requester is the minion id the master set (``__pub_id``), never a request argument;
    refusal is an error dict when this minion is not the signer or the requester is not an
    active node of the signer's own pillar."""
    requester = kwargs.get("__pub_id") or __opts__["id"]
    data = _pillar()
    view = kwargs.get("view")
    if view and view != __utils__["apigee_mtls_plan.pillar_fingerprint"](data):
        # the requester's state run compiled the pillar as edited; this minion's copy is the
        # one it loaded: ask the master for a fresh one
        log.info("apigee_mtls: %s sees another pillar: answering %s from a fresh one",
                 requester, what)
        data = (__salt__["pillar.items"](unmask=True) or {}).get(PILLAR_KEY)
    try:
        model = __utils__["apigee_mtls_plan.normalize"](data)
    except ValueError as exc:
        return requester, data, None, _error(exc)
    if model["tls"]["signer"] != __opts__["id"]:
        return requester, data, model, {
            "error": f"{__opts__['id']} is not the signer ({model['tls']['signer']})"}
    nodes = {n["id"]: n for n in model["nodes"]}
    if requester not in nodes or nodes[requester].get("retired"):
        log.warning("apigee_mtls: refused %s to %s: not a node", what, requester)
        return requester, data, model, {
            "error": f"{requester} is not an active node in apigee_mtls:nodes"}
    return requester, data, model, None


def sign_agent_certificate(public_key=None, bundle_only=False, **kwargs):
    """
    Sign a Consul agent certificate for the requesting minion. Runs on the signer only; other
    minions reach it through :py:func:`ask_signer` (the master's reactor runs
    :py:func:`answer_request`, which calls this).

    The identity is not taken from the request: the signer computes the certificate's CN and
    SANs for the *requesting minion id* (``__pub_id``: the id the master stamped on the
    request event, passed by :py:func:`answer_request`) from its own copy of
    the topology pillar. A minion can therefore only obtain its own identity, and only a
    Consul server gets ``server.<dc>.consul``. The CA private key never leaves this host.
    The signing CA generation and the trusted ones come from this minion's pillar too
    (``tls:ca_generation``, ``tls:ca_trust``), never from the request.

    It answers other minions' states, which parse the answer: refusals and a bad pillar are
    therefore answered as ``{"error": ...}`` dicts, not raised.

    :param str public_key: PEM public key of the requester (its private key stays on the
        requester); not needed with ``bundle_only``
    :param bool bundle_only: ``True``: sign nothing, only return the CA bundle (a node that must
        trust a new CA generation while its certificate stays valid); default ``False``
    :param kwargs: Salt's job arguments; ``__pub_id`` (the requesting minion, set by the
        master) is the only one read
    :return: ``{"certificate": PEM, "ca_bundle": PEM, "generation": N, "generations": [...]}``
        (no ``certificate`` with ``bundle_only``), or ``{"error": ...}`` (with ``"retry": True``
        while a trusted CA generation does not exist yet on the signer; with ``"key"`` for a bad
        pillar)
    :raises CommandExecutionError: Salt's x509 module failed to sign

    CLI Example (signing for the signer itself):

    .. code-block:: bash

        salt-call apigee_mtls.sign_agent_certificate "$(cat agent.pub)"
    """
    requester, data, model, refused = _signer_request(kwargs, "a certificate")
    if refused:
        return refused
    generation = model["tls"]["ca_generation"]
    generations = [generation] + model["tls"]["ca_trust"]
    missing = _missing_generations(generations)
    if missing:
        return {"error": "CA not ready yet on the signer (generation "
                         f"{', '.join(str(g) for g in missing)})", "retry": True}
    answer = {"ca_bundle": _ca_bundle(generations), "generation": generation,
              "generations": generations}
    if bundle_only:
        return answer
    if not public_key:
        return {"error": "no public key to sign"}
    ident = __utils__["apigee_mtls_plan.plan"](data, requester)["certificate"]
    san = ", ".join(
        [f"DNS:{d}" for d in ident["dns_sans"]] + [f"IP:{i}" for i in ident["ip_sans"]]
    )
    try:
        cert = __salt__["x509.create_certificate"](
            signing_private_key=_ca_file(generation, "key"),
            signing_cert=_ca_file(generation, "cert"),
            public_key=public_key,
            CN=ident["cn"],
            O="apigee_mtls",
            subjectAltName=san,
            basicConstraints="critical, CA:false",
            keyUsage="critical, digitalSignature, keyEncipherment",
            extendedKeyUsage="serverAuth, clientAuth",
            subjectKeyIdentifier="hash",
            authorityKeyIdentifier="keyid:always",
            days_valid=model["tls"]["cert_days_valid"],
            digest="sha256",
        )
    except Exception as exc:  # pylint: disable=broad-except
        log.error("apigee_mtls: signing for %s failed: %s", requester, exc)
        raise CommandExecutionError(f"signing failed: {exc}") from exc
    log.info("apigee_mtls: signed agent certificate for %s (CA generation %s)", requester,
             generation)
    answer["certificate"] = cert
    return answer


def _acl_util(name):
    return __utils__["apigee_mtls_acl." + name]


def _policy_pattern(kind):
    return re.compile(r"{}-{}-[0-9a-f]{{10}}".format(re.escape(ACL_PREFIX), re.escape(kind)))


def _ensure_token(mgmt, kind, policy, rules, description):
    """The SecretID of the managed token ``kind`` (fixed AccessorID), linked to exactly the
    policy ``policy`` (created with ``rules`` when missing); stale policies of ``kind`` are
    deleted. Runs on the signer with the management token."""
    api = _acl_util("api")
    policies = {p["Name"]: p for p in api("GET", "/v1/acl/policies", mgmt) or []}
    if policy not in policies:
        policies[policy] = api("PUT", "/v1/acl/policy", mgmt, {
            "Name": policy, "Rules": rules, "Description": "managed by apigee_mtls"})
    accessor = __utils__["apigee_mtls_plan.acl_accessor"](kind)
    try:
        token = api("GET", f"/v1/acl/token/{accessor}", mgmt)
    except Exception as exc:  # pylint: disable=broad-except
        if getattr(exc, "status", None) not in (403, 404) or \
                "not found" not in str(exc).lower():
            raise
        token = None
    link = [{"Name": policy}]
    if token is None:
        token = api("PUT", "/v1/acl/token", mgmt, {
            "AccessorID": accessor, "Description": description, "Policies": link,
            "Local": False})
    elif [p["Name"] for p in token.get("Policies") or []] != [policy]:
        token = api("PUT", f"/v1/acl/token/{accessor}", mgmt, {
            "AccessorID": accessor, "SecretID": token["SecretID"], "Description": description,
            "Policies": link, "Local": False})
    stale = _policy_pattern(kind)
    for name, pol in policies.items():
        if name != policy and stale.fullmatch(name):
            api("DELETE", f"/v1/acl/policy/{pol['ID']}", mgmt)
    return token["SecretID"]


def management_token_file():
    """
    Path of the Consul ACL management token on the signer
    (``<consul:config_dir>/acl/management.token``). Takes no parameters.

    :return: the path (str)
    :raises CommandExecutionError: the pillar is invalid (``apigee_mtls: invalid pillar:
        <key>: <what is wrong>``, one line)

    CLI Example:

    .. code-block:: bash

        salt n1 apigee_mtls.management_token_file
    """
    return _model()["consul"]["config_dir"] + "/acl/management.token"


def issue_acl_token(public_key=None, **kwargs):
    """
    Issue (or re-issue) the Consul ACL tokens of the requesting minion. Runs on the signer,
    which holds the management token; other minions reach it through :py:func:`ask_signer`
    (the master's reactor runs :py:func:`answer_request`, which calls this).

    Like :py:func:`sign_agent_certificate`, the identity is the requesting minion id
    (``__pub_id``, stamped by the master), and the token's policy comes from the signer's own
    pillar: write on that node's own services and sidecars only. The tokens are returned
    sealed to ``public_key`` (the requester's agent key; see ``apigee_mtls_acl.seal``): the
    master's job cache only ever holds ciphertext. Refusals and a bad pillar are answered as
    ``{"error": ...}`` dicts, which the requesting state parses.

    :param str public_key: PEM public key (EC) of the requester's Consul agent key, the token
        is sealed to it
    :param kwargs: Salt's job arguments; ``__pub_id`` (the requesting minion, set by the
        master) is the only one read
    :return: ``{"policy": name, "agent": sealed[, "replication_policy": name, "replication":
        sealed]}`` (a replication token for the servers of secondary data centers), or
        ``{"error": ..., "retry": bool}``

    CLI Example (the signer's own token, sealed to its own agent key):

    .. code-block:: bash

        salt-call apigee_mtls.issue_acl_token "$(openssl ec -pubout < agent-key.pem)"
    """
    requester, data, model, refused = _signer_request(kwargs, "an ACL token")
    if refused:
        return refused
    if not model["acl"]["enabled"]:
        return {"error": "ACLs are disabled (apigee_mtls:acl:enabled)"}
    if not public_key:
        return {"error": "no public key to seal the token to"}
    mgmt = _acl_util("read_token")(model["consul"]["config_dir"] + "/acl/management.token")
    if not mgmt:
        return {"error": "ACLs are not bootstrapped yet on the signer", "retry": True}
    acl = __utils__["apigee_mtls_plan.plan"](data, requester)["acl"]
    seal = _acl_util("seal")
    try:
        answer = {"policy": acl["policy"], "agent": seal(public_key, _ensure_token(
            mgmt, "node-" + requester, acl["policy"], acl["rules"],
            f"apigee_mtls node {requester}"))}
        if acl["replication"]:
            answer["replication_policy"] = acl["replication_policy"]
            answer["replication"] = seal(public_key, _ensure_token(
                mgmt, "replication", acl["replication_policy"],
                _replication_rules(), "apigee_mtls replication"))
    except Exception as exc:  # pylint: disable=broad-except
        if not hasattr(exc, "status"):
            return {"error": f"cannot seal to this public key: {exc}"}
        # concurrent requests may race on a policy name: asking again settles it
        return {"error": f"Consul: {exc}", "retry": exc.status != 403}
    log.info("apigee_mtls: issued the ACL token of %s (policy %s)", requester, acl["policy"])
    return answer


#: what a node may ask the signer, through :py:func:`answer_request`
SIGNER_FUNCTIONS = ("sign_agent_certificate", "issue_acl_token")
#: the arguments a request may carry (the requester's identity is never one of them)
REQUEST_ARGS = ("public_key", "bundle_only", "view")
REQUEST_TAG = "apigee_mtls/request"
ANSWER_TAG = "apigee_mtls/answer"
_REQUEST_ID = re.compile(r"[0-9a-f]{32}")


def _answers_dir():
    return os.path.join(__opts__["cachedir"], "apigee_mtls", "answers")


def ask_signer(fun, signer=None, timeout=20, **kwargs):
    """
    Ask the signer ``fun`` (``sign_agent_certificate`` or ``issue_acl_token``) for this
    minion, and wait for its answer. The signer answers its own requests directly. Another
    minion sends one event to the master (``apigee_mtls/request``, Salt's ``event.fire_master``:
    one cheap request); the master's reactor runs :py:func:`answer_request` on the signer, whose
    answer comes back as a job of :py:func:`accept_answer` on this minion, which leaves it in
    ``<cachedir>/apigee_mtls/answers/<request id>`` (0600) for this call to pick up. Nothing
    polls the master meanwhile: with peer publish (``publish.publish``) every waiting node
    polled it every 0.3 s, and a master worker that handles ``minion_pub`` blocks on a nested
    request to its own workers, so as many nodes asking at once as the master has workers
    (Salt's default: 4 in its ``default`` pool) stalled it for the request timeout.

    The master needs the two reactor entries of README ("Using it on a real cluster", step 2).
    Only an answer sent by ``signer`` (the id the master stamps on the answer event) to a
    request this call made is taken.

    :param str fun: ``sign_agent_certificate`` or ``issue_acl_token``
    :param str signer: minion id of the signer (default ``None``: this minion's plan's
        ``tls:signer``)
    :param int timeout: seconds to wait for the answer (default 20)
    :param kwargs: the request's arguments: ``public_key`` (PEM), ``bundle_only`` (bool),
        ``view`` (the pillar fingerprint the answer must be computed from); Salt's own
        ``__pub_*`` arguments are dropped
    :return: the signer's answer (a dict, see the two functions), or a string saying why
        there is none (no answer within ``timeout``: the reactor is not configured, or the
        master or the signer is busy or down); the caller asks again
    :raises CommandExecutionError: ``fun`` is not one of the two, or the pillar is invalid

    CLI Example:

    .. code-block:: bash

        salt-call apigee_mtls.ask_signer sign_agent_certificate bundle_only=True
    """
    if fun not in SIGNER_FUNCTIONS:
        raise CommandExecutionError(
            f"apigee_mtls: fun: the signer answers only {', '.join(SIGNER_FUNCTIONS)}, not {fun!r}")
    request = {k: v for k, v in kwargs.items() if k in REQUEST_ARGS}
    signer = signer or _model()["tls"]["signer"]
    if signer == __opts__["id"]:
        return globals()[fun](**request)
    request_id = uuid.uuid4().hex
    folder = _answers_dir()
    os.makedirs(folder, mode=0o700, exist_ok=True)
    pending = os.path.join(folder, request_id + ".pending")
    path = os.path.join(folder, request_id)
    with open(pending, "w", encoding="utf-8"):
        pass
    try:
        if not __salt__["event.fire_master"](
                {"request_id": request_id, "signer": signer, "fun": fun, "request": request},
                REQUEST_TAG):
            return "the master did not take the request event"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(path):
                with open(path, encoding="utf-8") as fh:
                    got = json.load(fh)
                if got.get("sender") == signer:
                    return got.get("answer")
                log.warning("apigee_mtls: dropped an answer from %s (the signer is %s)",
                            got.get("sender"), signer)
                os.unlink(path)
            time.sleep(0.25)
        return (f"no answer from {signer} within {timeout} s (does the master react to "
                f"{REQUEST_TAG} and {ANSWER_TAG}? README, step 2; is {signer} up?)")
    finally:
        for leftover in (pending, path):
            if os.path.exists(leftover):
                os.unlink(leftover)


def answer_request(requester, fun, request_id, request=None, **kwargs):
    """
    Answer one node's request and send the answer back to the master
    (``apigee_mtls/answer``), whose reactor hands it to the requester
    (:py:func:`accept_answer`). Runs on the signer, started by the master's reactor for an
    ``apigee_mtls/request`` event; ``requester`` is the minion id the master stamped on that
    event, never a field of the request.

    :param str requester: the requesting minion id (the reactor passes the event's ``id``)
    :param str fun: ``sign_agent_certificate`` or ``issue_acl_token``
    :param str request_id: the request's id (32 hex digits), echoed in the answer
    :param dict request: the request's arguments (``public_key``, ``bundle_only``, ``view``;
        others are ignored)
    :param kwargs: Salt's job arguments; a job published by a minion (``__pub_id``, peer
        publish) is refused: only the master's reactor may name a requester
    :return: ``{"requester": id, "request_id": id, "fun": fun, "sent": bool}`` (the answer
        itself goes to the requester only), or ``{"error": ...}``
    :raises: nothing; refusals are returned

    CLI Example (what the reactor runs):

    .. code-block:: bash

        salt n1 apigee_mtls.answer_request n5 sign_agent_certificate 0123...ef \\
            request='{"bundle_only": true}'
    """
    if kwargs.get("__pub_id"):
        log.warning("apigee_mtls: refused answer_request published by minion %s",
                    kwargs["__pub_id"])
        return {"error": "answer_request is started by the master's reactor, not by a minion"}
    if fun not in SIGNER_FUNCTIONS or not _REQUEST_ID.fullmatch(str(request_id)):
        return {"error": f"not a request: fun {fun!r}, request_id {request_id!r}"}
    args = {k: v for k, v in (request or {}).items() if k in REQUEST_ARGS}
    try:
        answer = globals()[fun](__pub_id=requester, **args)
    except CommandExecutionError as exc:
        answer = {"error": str(exc)}
    sent = __salt__["event.fire_master"](
        {"requester": requester, "request_id": request_id, "answer": answer}, ANSWER_TAG)
    return {"requester": requester, "request_id": request_id, "fun": fun, "sent": bool(sent)}


def accept_answer(sender, request_id, answer=None):
    """
    Take the signer's answer to a request of this minion (started by the master's reactor
    for an ``apigee_mtls/answer`` event; ``sender`` is the minion id the master stamped on
    it). The answer is left for the waiting :py:func:`ask_signer` call, which checks
    ``sender``; an answer to no pending request of this minion is dropped.

    :param str sender: the minion that sent the answer
    :param str request_id: the request's id (32 hex digits)
    :param dict answer: the signer's answer (a certificate, or ACL tokens sealed to this
        node's agent key: nothing secret in clear)
    :return: ``True`` when a pending request took it, ``False`` otherwise
    :raises: nothing

    CLI Example (what the reactor runs):

    .. code-block:: bash

        salt n5 apigee_mtls.accept_answer n1 0123...ef answer='{"error": "test"}'
    """
    if not _REQUEST_ID.fullmatch(str(request_id)):
        return False
    folder = _answers_dir()
    if not os.path.exists(os.path.join(folder, request_id + ".pending")):
        log.info("apigee_mtls: dropped an answer to no pending request (%s from %s)",
                 request_id, sender)
        return False
    tmp = os.path.join(folder, request_id + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"sender": sender, "answer": answer}, fh)
    os.rename(tmp, os.path.join(folder, request_id))
    return True


def _replication_rules():
    return __utils__["apigee_mtls_plan.replication_rules"]()


def _uid_to_name(rule):
    """``iptables -S`` prints ``--uid-owner`` as a number; the plan uses the user name."""
    words = rule.split()
    for i, word in enumerate(words[:-1]):
        if word == "--uid-owner" and words[i + 1].isdigit():
            try:
                words[i + 1] = pwd.getpwuid(int(words[i + 1])).pw_name
            except KeyError:
                pass
    return " ".join(words)


def ipv6_skip_reason():
    """
    Why this host's IPv6 firewall is skipped, or ``None`` when it is managed: ``"IPv6
    disabled"`` (no ``/proc/net/if_inet6``, or ``net.ipv6.conf.all.disable_ipv6`` is 1) or
    ``"no ip6tables binary"``. The firewall script decides the same way. Takes no parameters
    and raises nothing.

    :return: str or None

    CLI Example:

    .. code-block:: bash

        salt n1 apigee_mtls.ipv6_skip_reason
    """
    if not os.path.exists("/proc/net/if_inet6"):
        return "IPv6 disabled"
    try:
        with open("/proc/sys/net/ipv6/conf/all/disable_ipv6", encoding="ascii") as fh:
            if fh.read().strip() == "1":
                return "IPv6 disabled"
    except OSError:
        pass
    if not __salt__["cmd.which"]("ip6tables"):
        return "no ip6tables binary"
    return None


def _live_chain(cmd, table, chain, parent):
    """(rules of ``chain`` or None when it does not exist, whether ``parent`` jumps to it)."""
    res = __salt__["cmd.run_all"](
        [cmd, "-w", "-t", table, "-S", chain], python_shell=False, ignore_retcode=True,
    )
    live = None
    if res["retcode"] == 0:
        live = [_uid_to_name(rule) for rule in res["stdout"].splitlines()
                if rule.startswith("-A ")]
    jump = __salt__["cmd.run_all"](
        [cmd, "-w", "-t", table, "-C", parent, "-j", chain], python_shell=False,
        ignore_retcode=True,
    )["retcode"] == 0
    return live, jump


def _ip6_status(node_plan):
    """The ``ip6:<chain>`` entries of :py:func:`firewall_status`."""
    want6 = (node_plan.get("firewall") or {}).get("ip6")
    skipped = ipv6_skip_reason()
    out = {}
    for key, (chain, parent, part) in CHAINS6.items():
        entry = {"family": "ipv6", "table": "filter", "parent": parent,
                 "want": None if want6 is None else want6.get(part, [])}
        if skipped:
            entry.update(skipped=skipped, live=None, jump=False)
        else:
            entry["live"], entry["jump"] = _live_chain("ip6tables", "filter", chain, parent)
        out[key] = entry
    return out


def chain_drifted(status):
    """
    Whether one :py:func:`firewall_status` entry differs from the plan: a missing or extra
    rule, or a missing jump; with no plan (``want`` None: ``firewall:ipv6`` false), any chain
    or jump of the formula left over. A skipped entry (host without IPv6) never drifts.

    :param dict status: one value of :py:func:`firewall_status` (``want``, ``live``, ``jump``,
        optionally ``skipped``)
    :return: bool
    :raises CommandExecutionError: ``status`` is not such an entry

    CLI Example (:py:func:`verify` reports the drifted chains of a node):

    .. code-block:: bash

        salt-call apigee_mtls.chain_drifted '{"want": [], "live": null, "jump": false}'
        salt n1 apigee_mtls.verify
    """
    if not isinstance(status, dict) or not {"want", "live", "jump"} <= set(status):
        raise CommandExecutionError(
            "status: expected one entry of apigee_mtls.firewall_status (a mapping with "
            f"want, live and jump), got {status!r}")
    if status.get("skipped"):
        return False
    if status["want"] is None:
        return status["live"] is not None or status["jump"]
    return status["live"] != status["want"] or not status["jump"]


def firewall_status(node_plan=None):
    """
    The formula's iptables and ip6tables chains on this node, live and planned. IPv4 keys are
    the chain names; IPv6 keys are ``ip6:<chain>``, with ``family: ipv6``, ``want`` None when
    ``firewall:ipv6`` is false, and ``skipped: <why>`` on a host without IPv6 (see
    :py:func:`ipv6_skip_reason`).

    :param dict node_plan: a plan (:py:func:`plan`) or at least ``{"firewall": ...}`` to
        compare with (default ``None``: this minion's plan)
    :return: ``{key: {"table", "parent", "want": [rules] or None, "live": [rules] or None,
        "jump": bool}}``
    :raises CommandExecutionError: the pillar is invalid (``apigee_mtls: invalid pillar:
        <key>: <what is wrong>``, one line)
    :raises CommandExecutionError: ``node_plan`` is not a mapping

    CLI Example:

    .. code-block:: bash

        salt n1 apigee_mtls.firewall_status
    """
    if node_plan is not None and not isinstance(node_plan, dict):
        raise CommandExecutionError(
            f"node_plan: expected a plan (apigee_mtls.plan), got {node_plan!r}")
    node_plan = node_plan or plan()
    out = {}
    for table, (chain, parent) in CHAINS.items():
        live, jump = _live_chain("iptables", table, chain, parent)
        out[chain] = {"table": table, "parent": parent, "jump": jump, "live": live,
                      "want": (node_plan.get("firewall") or {}).get(table, [])}
    out.update(_ip6_status(node_plan))
    return out


def probe_upstream(port, address="127.0.0.1", timeout=1.5):
    """
    Connect to an egress upstream listener and see whether the mesh keeps the connection: a
    denied (no intention for this node's identity) or unroutable connection is accepted
    locally, then closed by the proxy; an allowed one is held open or answered.

    :param int port: the upstream's local port (its proxy port)
    :param str address: the listener's address (the plan's ``local_bind_address``; default
        ``127.0.0.1``)
    :param float timeout: seconds to wait for the mesh to close the connection
    :return: ``{"ok": bool, "detail": "held open" | "component spoke first" | "closed by the
        mesh" | "connect: <error>"}``
    :raises CommandExecutionError: ``port`` is not a TCP port, ``address`` not an IPv4
        address, ``timeout`` not a positive number

    CLI Example:

    .. code-block:: bash

        salt n1 apigee_mtls.probe_upstream 10001 address=127.108.152.23
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise CommandExecutionError(f"port: expected a TCP port, got {port!r}")
    try:
        ipaddress.IPv4Address(address)
    except ValueError as exc:
        raise CommandExecutionError(
            f"address: expected an IPv4 address, got {address!r}") from exc
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise CommandExecutionError(
            f"timeout: expected a positive number of seconds, got {timeout!r}")
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except OSError as exc:
        return {"ok": False, "detail": f"connect: {exc}"}
    try:
        sock.settimeout(timeout)
        data = sock.recv(1)
        return ({"ok": True, "detail": "component spoke first"} if data else
                {"ok": False, "detail": "closed by the mesh"})
    except socket.timeout:
        return {"ok": True, "detail": "held open"}
    except OSError as exc:
        return {"ok": False, "detail": str(exc)}
    finally:
        sock.close()


def _ipv6_word(fw):
    """What the firewall check did about IPv6, in one phrase."""
    entry = fw[next(iter(CHAINS6))]
    if entry.get("skipped"):
        return "skipped: " + entry["skipped"]
    if entry["want"] is None:
        return "not managed (apigee_mtls:firewall:ipv6 is false)"
    return "checked"


def verify(probe_timeout=1.5, http_port=8500, firewall=True, lockdown=True, summary=False):
    """
    Check this node's part of the mesh and return a structured verdict; on a failed check the
    salt command exits non-zero (the verdict is a report: a failed check is not an exception).
    Checks: Consul membership of every node of this data center, a leader, every planned
    service and sidecar registered with passing checks, a Connect leaf certificate issued by
    the data center's CA, the firewall chains (IPv4, and IPv6 unless the host has none:
    ``checks.firewall.ipv6`` says "skipped: IPv6 disabled" then) equal to the plan, and an
    end-to-end probe of every egress upstream (the connection must survive the mesh: mTLS
    handshake and intention check at the destination; a leader-only port, ZooKeeper's 2888,
    is listed under ``leader_only_unanswered`` where no leader serves it, without failing).

    :param float probe_timeout: seconds each upstream probe waits for the mesh to close the
        connection (default 1.5)
    :param int http_port: the local Consul agent's HTTP port (default 8500)
    :param bool firewall: ``False`` skips the firewall check (a staged rollout before its
        redirect stage); default ``True``
    :param bool lockdown: ``False`` compares the chains with the redirect stage's (meshed ports
        not yet locked); default ``True``
    :param bool summary: ``True`` returns one line instead (``OK: ...`` with the counts, or
        ``FAILED: ...`` with only what failed): one line per node at a glance; default
        ``False``
    :return: ``{"ok": bool, "checks": {name: {"ok": bool, ...}}}``; ``{"ok": True, "member":
        False}`` on a minion outside the pillar; ``{"ok": False, "error": ...}`` when py-consul
        is missing or the local agent does not answer; with ``summary=True``, a str
    :raises CommandExecutionError: the pillar is invalid (``apigee_mtls: invalid pillar:
        <key>: <what is wrong>``, one line)
    :raises CommandExecutionError: an argument has the wrong type or range

    CLI Example:

    .. code-block:: bash

        salt '*' apigee_mtls.verify
        salt '*' apigee_mtls.verify summary=True
        salt n1 apigee_mtls.verify firewall=False probe_timeout=3
    """
    _check_bool("summary", summary)
    result = _verify(probe_timeout, http_port, firewall, lockdown)
    if summary:
        return __utils__["apigee_mtls_plan.verify_line"](result)
    return result


def _verify(probe_timeout, http_port, firewall, lockdown):
    if isinstance(probe_timeout, bool) or not isinstance(probe_timeout, (int, float)) or \
            probe_timeout <= 0:
        raise CommandExecutionError(
            f"probe_timeout: expected a positive number of seconds, got {probe_timeout!r}")
    if isinstance(http_port, bool) or not isinstance(http_port, int) or \
            not 1 <= http_port <= 65535:
        raise CommandExecutionError(f"http_port: expected a TCP port, got {http_port!r}")
    _check_bool("firewall", firewall)
    _check_bool("lockdown", lockdown)
    node_plan = plan(lockdown=lockdown)
    if not node_plan.get("member"):
        return {"ok": True, "member": False}
    if not HAS_CONSUL:
        __context__["retcode"] = 1
        return {"ok": False, "error": "py-consul is not installed"}
    checks = {}
    # with ACLs, read the agent as this node's own token does (anonymous sees nothing)
    token = None
    if node_plan.get("acl", {}).get("enabled"):
        token = _acl_util("read_token")(node_plan["acl"]["agent_token_file"])
        checks["acl_token"] = {"ok": bool(token),
                               "file": node_plan["acl"]["agent_token_file"]}
    api = _acl_util("api")
    try:
        # (py-consul does not send a token with every call: plain requests with the header)
        members = api("GET", "/v1/agent/members", token, port=http_port) or []
        leader = api("GET", "/v1/status/leader", token, port=http_port)
        services = api("GET", "/v1/agent/services", token, port=http_port) or {}
        agent_checks = api("GET", "/v1/agent/checks", token, port=http_port) or {}
    except Exception as exc:  # pylint: disable=broad-except
        __context__["retcode"] = 1
        return {"ok": False, "error": f"local Consul agent not answering: {exc}"}
    model = _model()
    dc = node_plan["datacenter"]
    expected = {n["id"] for n in model["nodes"] if n["datacenter"] == dc and not n["retired"]}
    # serf status 1 alive; 2 "leaving" is how some peers keep seeing a server that restarted
    # without leaving (Consul bug hashicorp/consul#6882): present, but reported
    status = {m["Name"]: m.get("Status") for m in members}
    present = {name for name, st in status.items() if st in (1, 2)}
    checks["members"] = {"ok": expected <= present, "missing": sorted(expected - present),
                         "stale_leaving": sorted(n for n in expected if status.get(n) == 2)}
    checks["leader"] = {"ok": bool(leader), "leader": leader}
    bad = []
    for svc in node_plan["proxies"]:
        sidecar = f"{svc}-sidecar-proxy"
        if svc not in services or sidecar not in services:
            bad.append(f"{svc}: not registered")
            continue
        failing = [c["Name"] for c in agent_checks.values()
                   if c.get("ServiceID") == sidecar and c.get("Status") != "passing"]
        if failing:
            bad.append(f"{sidecar}: {', '.join(failing)}")
    checks["services"] = {"ok": not bad, "count": len(node_plan["proxies"]), "problems": bad}
    # the data center's Connect CA issues this node's leaf certificates (a secondary data
    # center whose CA has no intermediate fails here: "no PEM-encoded data found")
    leaf = node_plan.get("leaf_check") or {}
    if leaf:
        try:
            api("GET", f"/v1/agent/connect/ca/leaf/{leaf['service']}", token, port=http_port)
            checks["leaf"] = {"ok": True, "service": leaf["service"]}
        except Exception as exc:  # pylint: disable=broad-except
            checks["leaf"] = {"ok": False, "service": leaf["service"],
                              "datacenter": leaf["datacenter"], "error": str(exc)}
    if firewall:
        fw = firewall_status(node_plan)
        drift = [c for c, st in fw.items() if chain_drifted(st)]
        checks["firewall"] = {"ok": not drift, "drifted": drift, "ipv6": _ipv6_word(fw)}
    # all upstreams at once: each probe holds its connection for probe_timeout
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        futures = {up["service"]: pool.submit(probe_upstream, up["proxy_port"],
                                              up["local_bind_address"], probe_timeout)
                   for up in node_plan["upstreams"]}
    probes = {svc: fut.result() for svc, fut in futures.items()}
    checks["upstreams"] = __utils__["apigee_mtls_plan.upstream_verdict"](
        node_plan["upstreams"], probes)
    result = {"ok": all(c["ok"] for c in checks.values()), "checks": checks}
    if not result["ok"]:
        __context__["retcode"] = 1
    return result
