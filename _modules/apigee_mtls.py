"""
Execution module for the apigee_mtls formula.

Thin wrappers around the pure planner (``_utils/apigee_mtls_plan.py``): they read the
``apigee_mtls`` pillar and this minion's id, and hand back plain data. The only functions that
touch the system are :py:func:`sign_agent_certificate` (runs on the signer, through peer
publish) and :py:func:`gossip_keygen` (randomness).

Sync it to the minions before use (``state.apply`` does not sync custom modules)::

    salt '*' saltutil.sync_all

:depends: cryptography (through Salt's ``x509_v2``)
"""

import logging
import os

from salt.exceptions import CommandExecutionError

log = logging.getLogger(__name__)

__virtualname__ = "apigee_mtls"

PILLAR_KEY = "apigee_mtls"
CA_DIR = "/etc/apigee-mtls/ca"
CA_KEY = os.path.join(CA_DIR, "ca-key.pem")
CA_CERT = os.path.join(CA_DIR, "ca.pem")


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
    return {"error": str(exc), "key": getattr(exc, "key", None)}


def validate(pillar=None):
    """
    Validate the ``apigee_mtls`` pillar (or the given dict) and return the normalized model,
    or ``{"error": "<key>: <what is wrong>", "key": "<key>"}``.

    Secrets are masked in the returned model.

    CLI Example:

    .. code-block:: bash

        salt '*' apigee_mtls.validate
    """
    data = _pillar() if pillar is None else pillar
    try:
        model = __utils__["apigee_mtls_plan.normalize"](data)
    except ValueError as exc:
        return _error(exc)
    return _mask(model)


def _mask(obj):
    if isinstance(obj, dict):
        return {
            k: ("<hidden>" if k in ("gossip_key", "secrets") and v else _mask(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [_mask(v) for v in obj]
    return obj


def plan(node_id=None, pillar=None, secrets=False):
    """
    The full plan for one node (default: this minion): Consul agent config, services,
    sidecars, upstreams, firewall chains, certificate identity. On a bad pillar returns
    ``{"error": ...}``; on a minion that is not in ``apigee_mtls:nodes`` returns
    ``{"member": False}``.

    Secrets (the gossip key under ``encrypt_config``) are hidden unless ``secrets=True``,
    which only the formula's own templates pass: a job return lands in the job cache.

    CLI Example:

    .. code-block:: bash

        salt-call apigee_mtls.plan --out=json
    """
    data = _pillar() if pillar is None else pillar
    node_id = node_id or __opts__["id"]
    try:
        model = __utils__["apigee_mtls_plan.normalize"](data)
        if node_id not in {n["id"] for n in model["nodes"]}:
            return {"member": False, "node_id": node_id}
        result = __utils__["apigee_mtls_plan.plan"](data, node_id)
    except ValueError as exc:
        return _error(exc)
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
    return result


def intentions(pillar=None):
    """
    The intentions the cluster should have (default deny first, then one allow per flow).

    CLI Example:

    .. code-block:: bash

        salt-call apigee_mtls.intentions
    """
    data = _pillar() if pillar is None else pillar
    try:
        return __utils__["apigee_mtls_plan.intentions"](data)
    except ValueError as exc:
        return _error(exc)


def ports(pillar=None):
    """
    The port report: per node, the egress port, every ingress listener (service, component
    port, proxy port) and the upstreams, like the vendor's port report.

    CLI Example:

    .. code-block:: bash

        salt-call apigee_mtls.ports
    """
    data = _pillar() if pillar is None else pillar
    try:
        return __utils__["apigee_mtls_plan.port_report"](data)
    except ValueError as exc:
        return _error(exc)


report = ports


def gossip_keygen():
    """
    Generate a new gossip encryption key (32 random bytes, base64), for the operator to put
    in pillar as ``apigee_mtls:secrets:gossip_key``. The formula never generates or replaces
    the key by itself.

    CLI Example:

    .. code-block:: bash

        salt-call --local apigee_mtls.gossip_keygen
    """
    return __utils__["apigee_mtls_plan.gossip_keygen"]()


def ca_ready():
    """
    True when this minion holds the cluster CA (key and certificate).

    CLI Example:

    .. code-block:: bash

        salt n1 apigee_mtls.ca_ready
    """
    return os.path.isfile(CA_KEY) and os.path.isfile(CA_CERT)


def sign_agent_certificate(public_key, **kwargs):
    """
    Sign a Consul agent certificate for the requesting minion. Runs on the signer only; other
    minions reach it through peer publish (master config
    ``peer: {'.*': [apigee_mtls.sign_agent_certificate]}``).

    The identity is not taken from the request: the signer computes the certificate's CN and
    SANs for the *requesting minion id* (``__pub_id``, set by the master) from its own copy of
    the topology pillar. A minion can therefore only obtain its own identity, and only a
    Consul server gets ``server.<dc>.consul``. The CA private key never leaves this host.

    public_key
        PEM public key of the requester (its private key stays on the requester).

    Returns ``{"certificate": PEM, "ca_bundle": PEM}`` or ``{"error": ...}``.

    CLI Example (signing for the signer itself):

    .. code-block:: bash

        salt-call apigee_mtls.sign_agent_certificate "$(cat agent.pub)"
    """
    requester = kwargs.get("__pub_id") or __opts__["id"]
    data = _pillar()
    try:
        model = __utils__["apigee_mtls_plan.normalize"](data)
    except ValueError as exc:
        return _error(exc)
    if model["tls"]["signer"] != __opts__["id"]:
        return {"error": f"{__opts__['id']} is not the signer ({model['tls']['signer']})"}
    nodes = {n["id"]: n for n in model["nodes"]}
    if requester not in nodes or nodes[requester].get("retired"):
        log.warning("apigee_mtls: refused to sign for %s: not a node", requester)
        return {"error": f"{requester} is not an active node in apigee_mtls:nodes"}
    if not ca_ready():
        return {"error": "CA not ready yet on the signer", "retry": True}
    ident = __utils__["apigee_mtls_plan.plan"](data, requester)["certificate"]
    san = ", ".join(
        [f"DNS:{d}" for d in ident["dns_sans"]] + [f"IP:{i}" for i in ident["ip_sans"]]
    )
    try:
        cert = __salt__["x509.create_certificate"](
            signing_private_key=CA_KEY,
            signing_cert=CA_CERT,
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
    with open(CA_CERT, encoding="utf-8") as fh:
        ca_pem = fh.read()
    log.info("apigee_mtls: signed agent certificate for %s", requester)
    return {"certificate": cert, "ca_bundle": ca_pem}
