"""
States of the Envoy data plane (``proxy:data_plane: envoy``; ``docs/design-envoy.md``;
``apigee_mtls.mesh.envoy`` wires them).

- :py:func:`certificates_managed`: the leaf certificates of the node's ingress services and
  egress identity, and the Connect CA roots, as the local Consul agent issues them, with the
  SDS documents that point Envoy at them; replaced by renaming, so that Envoy reloads them
  without a restart.
- :py:func:`resources_managed`: the node's listeners and clusters (``lds.json``,
  ``cds.json``), rendered from the node's plan (``apigee_mtls_envoy.resources``) and the
  Connect CA's trust domain; Envoy reloads them.
- :py:func:`bootstrap_managed`: Envoy's bootstrap (a change restarts Envoy: the SLS watches
  this state only, with the unit and the binary).

Both fill ``changes`` before looking at ``test`` (``result: None`` and a "would" comment in
test mode) and never return a certificate, a key or a token: ``changes`` names files.

:depends: the ``apigee_mtls_acl`` and ``apigee_mtls_envoy`` utils (synced with the formula)
"""

import glob
import json
import os
import time

__virtualname__ = "apigee_mtls_envoy"

#: what this state owns in its directories (anything else there is left alone)
_OWNED = ("*.pem", "*.json")
#: the local agent's answer while it has not joined its cluster: a node just added, whose
#: peers' firewalls admit it only when they apply (README, "add a node")
NOT_JOINED = "No known Consul servers"
#: an empty LDS/CDS document: what Envoy starts with until the certificates exist
_EMPTY = json.dumps({"resources": []}, sort_keys=True)


def __virtual__():
    for util in ("apigee_mtls_acl.api", "apigee_mtls_envoy.resources"):
        if util not in __utils__:
            return (False, f"{util} is not loaded: run saltutil.sync_all")
    return __virtualname__


def _ret(name):
    return {"name": name, "result": True, "changes": {}, "comment": ""}


def _ids(user, group):
    """``(uid, gid)``; ``(None, None)`` while the user does not exist yet (a preview)."""
    import grp  # pylint: disable=import-outside-toplevel
    import pwd  # pylint: disable=import-outside-toplevel

    try:
        return pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid
    except KeyError:
        return None, None


def _read(path):
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return None


def _sync(ret, directory, wanted, user, group, what, owned=_OWNED):
    """Make ``directory`` hold exactly ``wanted`` (``{file name: text}``) among the files it
    owns (:data:`_OWNED`): changed and new ones written (0600, ``user``:``group``, by
    renaming; documents after the files they point at, as ``wanted`` orders them), the others
    removed. Fills ``ret``; returns it."""
    changed = [f for f, text in wanted.items() if _read(os.path.join(directory, f)) != text]
    stale = sorted(os.path.basename(p) for pattern in owned
                   for p in glob.glob(os.path.join(directory, pattern))
                   if os.path.basename(p) not in wanted)
    uid, gid = _ids(user, group)
    owner = _owner(directory)
    if owner is not None and uid is not None and owner != (uid, gid, 0o750):
        ret["changes"]["directory"] = f"{user}:{group} 0750"
    if changed:
        ret["changes"]["written"] = changed
    if stale:
        ret["changes"]["removed"] = stale
    if not ret["changes"]:
        ret["comment"] = f"{what} in {directory} are current"
        return ret
    if __opts__["test"]:
        ret["result"] = None
        ret["comment"] = (f"would write {len(changed)} and remove {len(stale)} file(s) of "
                          f"{what} in {directory}")
        return ret
    if uid is None:
        ret["result"] = False
        ret["comment"] = f"user {user} or group {group} does not exist"
        return ret
    # Envoy runs as ``user``: it must traverse the directory (makedirs leaves it root's)
    os.makedirs(directory, mode=0o750, exist_ok=True)
    os.chown(directory, uid, gid)
    os.chmod(directory, 0o750)
    for file_name in changed:
        __utils__["apigee_mtls_acl.write_secret"](os.path.join(directory, file_name),
                                                  wanted[file_name], uid, gid)
    for file_name in stale:
        os.unlink(os.path.join(directory, file_name))
    ret["comment"] = f"wrote {len(changed)} and removed {len(stale)} file(s) of {what}"
    return ret


def _owner(path):
    """``(uid, gid, mode bits)`` of ``path``, or None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_uid, st.st_gid, st.st_mode & 0o7777


def _agent(path, token_file):
    token = __utils__["apigee_mtls_acl.read_token"](token_file) if token_file else None
    return __utils__["apigee_mtls_acl.api"]("GET", path, token, timeout=15)


def _not_joined(exc):
    return NOT_JOINED in str(exc)


def _transient(exc):
    """A server-side error (``HTTP 5xx``: the Connect CA initialising or switching roots,
    "provider not initialized", no leader yet) or an agent not answering yet: retried."""
    return str(exc).startswith("HTTP 5") or isinstance(exc, OSError)


def _pems(text):
    from cryptography import x509  # pylint: disable=import-outside-toplevel

    return x509.load_pem_x509_certificates(text.encode())


def _unsettled(leaves, roots, org_root):
    """Why the agent's certificates are not final yet, or None: the pillar's organisation CA
    (``org_root``, parsed, or None) is not the active root yet (the signer switches it
    during the same run), or a leaf was not issued under the active root (the agent
    re-issues its leaves after a root change). Raises ValueError on a PEM it cannot read,
    KeyError or TypeError on an answer without one."""
    active = next((r for r in roots.get("Roots") or [] if r.get("Active")), None)
    if active is None:
        return "the agent lists no active root"
    root = _pems(active["RootCert"])[0]
    if org_root is not None and org_root != root:
        return "the organisation's CA (connect_ca:root_cert) is not the active root yet"
    for service, leaf in leaves.items():
        # CertPEM is the leaf, then the intermediates: a secondary data center's (issued by
        # the root), or after a root change the new root cross-signed by the old one
        chain = _pems(leaf["CertPEM"])
        issuers = {root.subject} | {c.subject for c in chain[1:] if c.issuer == root.subject}
        if chain[0].issuer not in issuers:
            return f"the leaf of {service} is not issued under the active root yet"
    return None


def certificates_managed(name, services, identity, token_file=None, user="consul",
                         group="consul", join_wait=60, root_cert=None, wait=120):
    """
    Ensure the directory ``name`` holds, for Envoy, the Connect leaf certificate and key of
    each of ``services`` and of ``identity`` as the local agent issues them (it renews them in
    its cache), the CA roots (every root the agent lists: old and new during a rotation), and
    the SDS documents that name them. Files are 0600, owned by ``user``; other ``*.pem`` and
    ``*.json`` files in ``name`` (a service no longer planned) are removed.

    :param str name: the directory (``/etc/apigee-mtls/envoy/certs``)
    :param list services: the node's ingress services (names)
    :param str identity: the node's egress identity
    :param str token_file: the node's ACL token (service:write on them), or None without ACLs
    :param str user: the owner (the user Envoy runs as)
    :param str group: the group
    :param int join_wait: seconds to wait for an agent that has not joined its cluster yet
        ("No known Consul servers": a node just added, admitted when its peers apply in the
        same run); after that the certificates are left to the next run, with a comment and
        no failure (default 60)
    :param str root_cert: the organisation's CA (``connect_ca:root_cert``, PEM), or None:
        the certificates are written once it is the agent's active root
    :param int wait: seconds to wait for the agent's certificates to settle: the
        organisation's CA active, every leaf issued under the active root, no server-side
        error (the CA initialising: "provider not initialized") (default 120)
    :return: the state return; ``changes``: ``written`` and ``removed`` file names
    :raises: nothing; an agent that does not issue a certificate is ``result: False`` naming
        the service, as are certificates that do not settle within ``wait``; in test mode an
        agent that does not answer yet is ``result: None``

    .. code-block:: yaml

        apigee-mtls-envoy-certificates-managed:
          apigee_mtls_envoy.certificates_managed:
            - name: /etc/apigee-mtls/envoy/certs
            - services: [zk-2181-10-77-0-11]
            - identity: egress-ms-zk-cass-ldap-ui
            - token_file: /etc/consul.d/acl/agent.token
    """
    ret = _ret(name)
    names = list(services) + [identity]
    try:
        org_root = _pems(root_cert)[0] if root_cert else None
    except ValueError as exc:
        ret["result"] = False
        ret["comment"] = f"connect_ca:root_cert is not a PEM certificate: {exc}"
        return ret
    began = time.monotonic()
    while True:
        wanted, leaves, asking = {}, {}, None
        try:
            for service in names:
                asking = f"a leaf certificate for {service}"
                leaves[service] = _agent(f"/v1/agent/connect/ca/leaf/{service}", token_file)
                wanted[f"{service}.pem"] = leaves[service]["CertPEM"]
                wanted[f"{service}-key.pem"] = leaves[service]["PrivateKeyPEM"]
            asking = "the CA roots"
            roots = _agent("/v1/agent/connect/ca/roots", token_file)
        except Exception as exc:  # pylint: disable=broad-except
            if __opts__["test"]:
                ret["result"] = None
                ret["comment"] = (f"would write the certificates once the local agent gives "
                                  f"{asking} (now: {exc})")
                return ret
            if _not_joined(exc) and time.monotonic() - began < join_wait:
                time.sleep(3)
                continue
            if not _not_joined(exc) and _transient(exc) and time.monotonic() - began < wait:
                time.sleep(2)
                continue
            if _not_joined(exc):
                ret["comment"] = (f"no certificates yet: this agent has not joined its "
                                  f"cluster ({exc}). A node just added is admitted when its "
                                  "peers apply apigee_mtls (README: add a node); the next run "
                                  "writes them, and Envoy serves nothing until then")
                return ret
            ret["result"] = False
            ret["comment"] = f"the local agent did not give {asking}: {exc}"
            return ret
        # Envoy reads files, not the agent: write what the agent will keep serving
        try:
            unsettled = _unsettled(leaves, roots, org_root)
        except (ValueError, KeyError, TypeError) as exc:
            ret["result"] = False
            ret["comment"] = (f"the local agent's certificates or CA roots do not parse "
                              f"({type(exc).__name__}: {exc}); nothing written")
            return ret
        if unsettled is None or __opts__["test"]:
            break
        if time.monotonic() - began >= wait:
            ret["result"] = False
            ret["comment"] = f"the agent's certificates did not settle in {wait} s: {unsettled}"
            return ret
        time.sleep(2)
    wanted["roots.pem"] = "".join(r["RootCert"].strip() + "\n" for r in roots["Roots"])
    docs = __utils__["apigee_mtls_envoy.secrets"](name, names)
    wanted.update({f: json.dumps(doc, sort_keys=True) for f, doc in docs.items()})
    return _sync(ret, name, wanted, user, group, "certificates")


def resources_managed(name, node_id, token_file=None, pillar=None, user="consul",
                      group="consul", certs_dir=None):
    """
    Ensure the directory ``name`` holds the node's Envoy listeners and clusters
    (``lds.json``, ``cds.json``), rendered from the node's plan
    and the cluster's intentions (``apigee_mtls_envoy.resources``) with the Connect CA's
    trust domain (asked of the local agent). Envoy reloads ``lds.json`` and ``cds.json``
    when they are replaced; a listener whose definition did not change keeps its
    connections.

    :param str name: the directory (``/etc/apigee-mtls/envoy``)
    :param str node_id: this node's ID in the pillar
    :param str token_file: the node's ACL token, or None without ACLs
    :param dict pillar: the ``apigee_mtls`` pillar (default: this minion's)
    :param str user: the owner (the user Envoy runs as)
    :param str group: the group
    :param str certs_dir: where :func:`certificates_managed` keeps the certificates
        (default: ``<name>/certs``)
    :return: the state return; ``changes``: ``written`` and ``removed`` file names
    :raises: nothing; a bad pillar or an agent without roots is ``result: False``

    .. code-block:: yaml

        apigee-mtls-envoy-resources-managed:
          apigee_mtls_envoy.resources_managed:
            - name: /etc/apigee-mtls/envoy
            - node_id: n1
            - token_file: /etc/consul.d/acl/agent.token
    """
    ret = _ret(name)
    certs_dir = certs_dir or os.path.join(name, "certs")
    if pillar is None:
        pillar = __salt__["pillar.get"]("apigee_mtls", None, unmask=True)
    try:
        plan = __utils__["apigee_mtls_plan.plan"](pillar, node_id)
        intentions = __utils__["apigee_mtls_plan.intentions"](pillar)
    except Exception as exc:  # pylint: disable=broad-except
        ret["result"] = False
        ret["comment"] = str(exc)
        return ret
    names = [svc["name"] for svc in plan["services"]]  # ingress services, egress identity
    missing = [f for f in __utils__["apigee_mtls_envoy.secrets"](certs_dir, names)
               if not os.path.exists(os.path.join(certs_dir, f))]
    if missing:
        # a listener naming a certificate file that does not exist is rejected, and Envoy
        # would not re-read it when the file appears: no listener until every file is there
        # (certificates_managed left them to the next run: an agent not joined yet)
        if all(os.path.exists(os.path.join(name, f)) for f in ("lds.json", "cds.json")):
            ret["comment"] = (f"certificates not written yet ({', '.join(missing[:3])}): "
                              "the listeners and clusters are left as they are")
            return ret
        return _sync(ret, name, {"lds.json": _EMPTY, "cds.json": _EMPTY}, user, group,
                     "Envoy's listeners and clusters (none until the certificates exist)",
                     owned=("lds.json", "cds.json"))
    try:
        trust_domain = _agent("/v1/agent/connect/ca/roots", token_file)["TrustDomain"]
    except Exception as exc:  # pylint: disable=broad-except
        ret["result"] = None if __opts__["test"] else False
        ret["comment"] = f"the local agent did not give the Connect CA's trust domain: {exc}"
        return ret
    out = __utils__["apigee_mtls_envoy.resources"](plan, intentions, trust_domain, certs_dir)
    docs = __utils__["apigee_mtls_envoy.documents"](out)
    wanted = {f: json.dumps(doc, sort_keys=True) for f, doc in docs.items()}
    return _sync(ret, name, wanted, user, group, "Envoy's listeners and clusters",
                 owned=tuple(wanted))


def bootstrap_managed(name, node_id, cluster, admin_port=19000, user="consul",
                      group="consul"):
    """
    Ensure ``name`` holds Envoy's bootstrap (``apigee_mtls_envoy.bootstrap``): listeners and
    clusters from ``lds.json`` and ``cds.json`` next to it, the admin interface on
    127.0.0.1:``admin_port``. Envoy reads it when it starts: the SLS restarts Envoy when this
    state changes it.

    :param str name: the bootstrap file (``/etc/apigee-mtls/envoy/bootstrap.json``)
    :param str node_id: the Envoy node ID (this node's ID)
    :param str cluster: the Envoy cluster name (the node's egress identity)
    :param int admin_port: Envoy's admin port on 127.0.0.1
    :param str user: the owner (the user Envoy runs as)
    :param str group: the group
    :return: the state return; ``changes``: ``written``

    .. code-block:: yaml

        apigee-mtls-mesh-envoy-bootstrap-managed:
          apigee_mtls_envoy.bootstrap_managed:
            - name: /etc/apigee-mtls/envoy/bootstrap.json
            - node_id: n1
            - cluster: egress-ms-zk-cass-ldap-ui
    """
    ret = _ret(name)
    directory, file_name = os.path.split(name)
    doc = __utils__["apigee_mtls_envoy.bootstrap"](node_id, cluster, directory,
                                                   admin_port=admin_port)
    return _sync(ret, directory, {file_name: json.dumps(doc, sort_keys=True)}, user, group,
                 "Envoy's bootstrap", owned=(file_name,))
