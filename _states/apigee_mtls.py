"""
States for the apigee_mtls formula.

- :py:func:`agent_certificate_managed`: this node's Consul agent certificate and CA bundle,
  signed by the cluster signer, asked through Salt's event bus and the master's reactor (the
  CA key never leaves the signer; the node's private key never leaves the node).
- :py:func:`acl_bootstrapped`: the Consul ACL system bootstrapped once, its management
  token on the signer only; tokens of nodes that left the pillar deleted.
- :py:func:`local_token_managed`: the agent's local ``agent_master`` token, made here.
- :py:func:`agent_config_managed`: the agent's ``consul.json``; a running agent is reloaded
  when Consul can reload every changed key, restarted otherwise.
- :py:func:`agent_current`: the running agent runs the installed binary and unit, else it
  restarts (servers one at a time under a Consul lock, the leader last; new connections to
  its sidecars held meanwhile).
- :py:func:`acl_token_managed`: this node's ACL token (and a secondary data center
  server's replication token), issued by the signer, sealed to the node's key.
- :py:func:`connect_ca_managed`: the organisation's CA as the Connect (mesh) root.
- :py:func:`intentions_managed`: the cluster's Consul intentions (default deny + one allow per
  role identity and ingress service), through py-consul against the local agent; creates
  missing, fixes wrong, removes stale (keeping those of identities still registered).
- :py:func:`firewall_managed`: the formula's own iptables and ip6tables chains, compared rule
  by rule with the live ones and rebuilt only when they differ.
- :py:func:`stale_connections_closed`: established connections from hosts that are no
  longer cluster members (a node removed from the pillar) closed on Consul's and the
  sidecars' ports (``ss -K``).
- :py:func:`members_pruned`: agents of nodes no longer in the pillar forced out of gossip.
- :py:func:`gossip_keyring_managed`: the gossip keyring rotated to the pillar's key.
- :py:func:`local_keyring_managed`: a node that missed a gossip key rotation (it was off) and
  is cut off from its peers gets the pillar's key as its own keyring's primary key, and its
  agent restarted.
- :py:func:`sidecars_current`: sidecars that started before the node's token file changed
  are restarted onto it.
- :py:func:`sidecar_listeners_managed`: a sidecar follows new and moved upstream ports live;
  stopped (started again on its new listeners) only when Consul 1.8's proxy cannot.
- :py:func:`egress_draining`, :py:func:`egress_switch_ready`, :py:func:`egress_drained`: an
  egress identity change (the move to role identities, a new component set) without a failed
  connection: the previous instance stays registered while its proxy drains; new connections
  move to the new proxy once it reaches every upstream the old one reaches; the old proxy
  stops once it carries no connection.
- :py:func:`connect_leaf_ready`: the end of a run: the local agent obtains a Connect leaf
  certificate, or the run fails saying why.

What a state needs from the pillar comes as arguments, which the formula's SLS files fill
from the plan; a state given none reads this minion's plan (``apigee_mtls.plan``) and fails
with its one-line error on a bad pillar. Every state fills ``changes`` before looking at
``test``, answers ``result: None`` with a "would" comment in test mode when it could check
(and says it could not check otherwise), and never puts secrets in its return.

:depends: cryptography, py-consul (intentions and keyring)
"""

import concurrent.futures
import datetime
import ipaddress
import json
import logging
import os
import random
import time

from salt.exceptions import CommandExecutionError

log = logging.getLogger(__name__)

__virtualname__ = "apigee_mtls"

MANAGED_BY = "apigee_mtls"
#: intentions written at once (each is one raft write on the servers)
INTENTION_WRITERS = 8

try:
    from cryptography import x509 as cx509
    from cryptography.hazmat.primitives import serialization

    HAS_CRYPTOGRAPHY = True
except ImportError:  # pragma: no cover
    HAS_CRYPTOGRAPHY = False

try:
    import consul
    from consul.callback import CB

    HAS_CONSUL = True
except ImportError:  # pragma: no cover
    HAS_CONSUL = False


def __virtual__():
    if not HAS_CRYPTOGRAPHY:
        return (False, "apigee_mtls states need the cryptography library")
    if "apigee_mtls.plan" not in __salt__:
        return (False, "apigee_mtls execution module not loaded; run saltutil.sync_all")
    return __virtualname__


def _ret(name):
    return {"name": name, "result": True, "changes": {}, "comment": ""}


def _pillar_call(ret, fun):
    """``__salt__[fun]()`` (a function of this minion's pillar), or None with ``ret`` set to
    a failure on a bad pillar (the execution module's one-line error)."""
    try:
        return __salt__[fun]()
    except CommandExecutionError as exc:
        ret["result"] = False
        ret["comment"] = str(exc)
        return None


def _member_plan(ret):
    """This minion's plan (``apigee_mtls.plan``), or None with ``ret`` set to a failure: a
    bad pillar (the execution module's one-line error) or a minion not in the pillar."""
    plan = _pillar_call(ret, "apigee_mtls.plan")
    if plan is None:
        return None
    if not plan.get("member"):
        ret["result"] = False
        ret["comment"] = "this minion is not in apigee_mtls:nodes"
        return None
    return plan


# ---------------------------------------------------------------------------------------------
# agent certificate
def _common_name(name):
    attrs = name.get_attributes_for_oid(cx509.NameOID.COMMON_NAME)
    return attrs[0].value if attrs else name.rfc4514_string()


def _issued_by(cert, ca):
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # pylint: disable=broad-except  # name mismatch, bad signature, key type
        return False
    return True


def _cert_problems(cert_pem, key_pem, bundle_pem, ident, days_remaining, generations,
                   now=None):
    """
    Why this node's agent certificate or CA bundle must change (pure: PEM bytes in, text out).

    ``generations`` is the plan's ``ca_generations`` (``[{"generation", "cn"}, ...]``, the
    signing generation first): the bundle must hold exactly those CAs in that order, and the
    certificate must be issued by the first. ``cert_pem``, ``key_pem``, ``bundle_pem`` are
    ``None`` for a missing file.

    :return: ``{"certificate": [problems], "ca_bundle": [problems]}``: a certificate problem
        needs a new certificate from the signer, a bundle problem alone only a new bundle
    """
    out = {"certificate": [], "ca_bundle": []}
    want = [g["cn"] for g in generations]
    cas = []
    if bundle_pem is None:
        out["ca_bundle"].append("CA bundle missing")
    else:
        try:
            cas = cx509.load_pem_x509_certificates(bundle_pem)
        except ValueError as exc:
            out["ca_bundle"].append(f"CA bundle unreadable: {exc}")
        have = [_common_name(ca.subject) for ca in cas]
        if cas and have != want:
            out["ca_bundle"].append(f"CA bundle holds {have}; expected {want}")
    if cert_pem is None:
        out["certificate"].append("certificate missing")
        return out
    try:
        cert = cx509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None) if key_pem else None
    except ValueError as exc:
        out["certificate"].append(f"unreadable: {exc}")
        return out
    problems = out["certificate"]
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.PEM
    if key is None:
        problems.append("private key missing")
    elif cert.public_key().public_bytes(enc, pub) != key.public_key().public_bytes(enc, pub):
        problems.append("certificate does not match the private key")
    try:
        san = cert.extensions.get_extension_for_class(cx509.SubjectAlternativeName).value
        dns = sorted(san.get_values_for_type(cx509.DNSName))
        ips = sorted(str(i) for i in san.get_values_for_type(cx509.IPAddress))
    except cx509.ExtensionNotFound:
        dns, ips = [], []
    if dns != sorted(ident["dns_sans"]) or ips != sorted(
        str(ipaddress.ip_address(i)) for i in ident["ip_sans"]
    ):
        problems.append("SANs differ from the topology")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    left = cert.not_valid_after_utc - now
    if left < datetime.timedelta(days=days_remaining):
        problems.append(f"expires in {left.days} days (renew below {days_remaining})")
    issuers = [ca for ca in cas if _issued_by(cert, ca)]
    current = [ca for ca in issuers if _common_name(ca.subject) == want[0]]
    if not issuers:
        problems.append("not issued by a CA in the trusted bundle")
    elif not current:
        problems.append(f"issued by {_common_name(cert.issuer)!r}, not by the signing CA "
                        f"{want[0]!r} (tls:ca_generation)")
    return out


def _read(path):
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return None


def _write(path, text, mode, user, group):
    """Write ``text`` (ended by a newline) to ``path``, owned by ``user``:``group`` with
    ``mode``, through Salt's file functions: a temporary file next to ``path`` gets the
    contents, owner and mode, then replaces ``path`` (Consul never reads a half-written
    certificate)."""
    tmp = path + ".tmp"
    text = text if text.endswith("\n") else text + "\n"
    __salt__["file.write"](tmp, text[:-1])  # file.write ends each argument with a newline
    __salt__["file.chown"](tmp, user, group)
    __salt__["file.set_mode"](tmp, mode)
    __salt__["file.rename"](tmp, path)


def _view():
    """The fingerprint of this run's ``apigee_mtls`` pillar, sent to the signer: a signer whose
    minion still holds an older pillar answers from a fresh one."""
    pillar = __salt__["pillar.get"]("apigee_mtls", None, unmask=True)
    return __utils__["apigee_mtls_plan.pillar_fingerprint"](pillar)


def _ask_signer(signer, pub, bundle_only):
    """The signer's answer (a dict), or what came back instead (``apigee_mtls.ask_signer``:
    the event bus and the master's reactor, no polling of the master)."""
    return __salt__["apigee_mtls.ask_signer"]("sign_agent_certificate", signer=signer,
                                              public_key=pub, bundle_only=bundle_only,
                                              view=_view())


def _retry_pause(attempt):
    """Seconds before asking the signer again: 2, 4, then 8 at most, each +-25 % at random,
    so that nodes that started together do not ask together again."""
    return min(2 * 2 ** attempt, 8) * random.uniform(0.75, 1.25)


def _gens(generations):
    return ", ".join(str(g["generation"]) for g in generations)


def agent_certificate_managed(
    name, private_key, ca_bundle, user="root", group="consul", wait=180, mode="0644",
    signer=None, identity=None, ca_generations=None, days_remaining=None, **kwargs
):
    """
    Ensure ``name`` holds a valid Consul agent certificate for this node, issued by the
    cluster signer with the signing CA generation, and ``ca_bundle`` the CA certificates of
    the trusted generations (``apigee_mtls:tls:ca_generation`` first, then ``ca_trust``).

    The certificate is (re)requested when it is missing, does not match ``private_key``,
    has other SANs than ``identity``, expires within ``days_remaining`` days, or is not issued
    by the signing CA generation (a CA rotation). When only the bundle differs (a rotation
    begins or ends), the bundle alone is fetched and the certificate kept. The answer is
    checked against this node's own identity and generations before anything is written: a
    signer that does not have the trusted generations yet (or an older pillar) is asked again
    until ``wait`` runs out, then the state fails, without writing. Files are written through
    Salt's ``file.write``, ``file.chown``, ``file.set_mode`` and ``file.rename`` (a temporary
    file renamed over the old one).

    :param str name: path of the certificate (PEM)
    :param str private_key: path of this node's private key (created beforehand, e.g. by
        ``x509.private_key_managed``); only its public key is sent
    :param str ca_bundle: path of the CA bundle to write
    :param str user: owner of both files (default ``root``)
    :param str group: group of both files (default ``consul``)
    :param int wait: seconds to keep asking while the signer's CA is not ready (first rollout,
        or a new CA generation: every node runs at once); default 180
    :param str mode: mode of both files (default ``"0644"``: public material)
    :param str signer: minion id of the signer (default ``None``: the plan's ``signer``)
    :param dict identity: the certificate's ``{"cn", "dns_sans", "ip_sans"}`` (default
        ``None``: the plan's ``certificate``)
    :param list ca_generations: the trusted ``[{"generation", "cn"}, ...]``, the signing one
        first (default ``None``: the plan's ``ca_generations``)
    :param int days_remaining: renew below this many days of validity (default ``None``:
        ``apigee_mtls:tls:cert_days_remaining``)
    :param kwargs: ignored
    :return: a state return; ``result: False`` when the pillar is invalid, the minion is not
        in it, the private key is missing or the signer did not sign in time

    .. code-block:: yaml

        apigee-mtls-tls-agent-cert-managed:
          apigee_mtls.agent_certificate_managed:
            - name: /etc/consul.d/tls/agent.pem
            - private_key: /etc/consul.d/tls/agent-key.pem
            - ca_bundle: /etc/consul.d/tls/ca.pem
            - group: consul
            - signer: n1
            - identity: {"cn": "n4", "dns_sans": ["localhost", "client.dc-1.consul"],
                         "ip_sans": ["10.77.0.14", "127.0.0.1"]}
            - ca_generations: [{"generation": 1, "cn": "apigee_mtls cluster CA"}]
            - days_remaining: 30
    """
    ret = _ret(name)
    if None in (signer, identity, ca_generations, days_remaining):
        plan = _member_plan(ret)
        if plan is None:
            return ret
        signer = signer or plan["signer"]
        identity = identity or plan["certificate"]
        ca_generations = ca_generations or plan["ca_generations"]
        if days_remaining is None:
            days_remaining = plan["tls"]["cert_days_remaining"]
    ident, cas = identity, ca_generations
    key_pem, cert_pem, bundle_pem = _read(private_key), _read(name), _read(ca_bundle)
    problems = _cert_problems(cert_pem, key_pem, bundle_pem, ident, days_remaining, cas)
    if not problems["certificate"] and not problems["ca_bundle"]:
        ret["comment"] = (f"Agent certificate is valid, issued by CA generation "
                          f"{cas[0]['generation']}; the CA bundle holds generations {_gens(cas)}")
        return ret
    need_cert = bool(problems["certificate"])
    if need_cert:
        ret["changes"]["certificate"] = {"reason": problems["certificate"], "sans": ident,
                                         "ca_generation": cas[0]["generation"]}
    if problems["ca_bundle"]:
        ret["changes"]["ca_bundle"] = {"reason": problems["ca_bundle"],
                                       "generations": [g["generation"] for g in cas]}
    if __opts__["test"]:
        ret["result"] = None
        ret["comment"] = (
            f"Would request a new agent certificate (CA generation {cas[0]['generation']})"
            if need_cert else f"Would fetch the CA bundle (generations {_gens(cas)})"
        ) + " from " + signer
        return ret
    if key_pem is None:
        ret["result"] = False
        ret["comment"] = f"private key {private_key} missing"
        ret["changes"] = {}
        return ret
    pub = __salt__["x509.get_public_key"](private_key)
    deadline = time.monotonic() + wait
    attempt = 0
    while True:
        answer = _ask_signer(signer, pub, bundle_only=not need_cert)
        retry = True
        if isinstance(answer, dict) and answer.get("ca_bundle") and (
            answer.get("certificate") or not need_cert
        ):
            new_cert = answer["certificate"].encode() if need_cert else cert_pem
            after = _cert_problems(new_cert, key_pem, answer["ca_bundle"].encode(), ident,
                                   days_remaining, cas)
            if not after["certificate"] and not after["ca_bundle"]:
                break
            if after["certificate"] and not need_cert:
                # the signer's bundle does not vouch for the certificate we have: replace it
                need_cert = True
                ret["changes"]["certificate"] = {"reason": after["certificate"], "sans": ident,
                                                 "ca_generation": cas[0]["generation"]}
                continue
            # e.g. the signer's pillar is not refreshed yet: its CAs are not ours
            last = "its answer does not match this node's pillar: " + "; ".join(
                after["certificate"] + after["ca_bundle"])
        else:
            last = answer.get("error") if isinstance(answer, dict) else answer
            retry = not isinstance(answer, dict) or not answer.get("error") or bool(
                answer.get("retry"))
        if time.monotonic() > deadline or not retry:
            ret["result"] = False
            ret["changes"] = {}
            ret["comment"] = f"signer {signer} did not sign: {last or 'no answer'}"
            return ret
        time.sleep(_retry_pause(attempt))
        attempt += 1
    if answer["ca_bundle"].encode() != bundle_pem:
        _write(ca_bundle, answer["ca_bundle"], mode, user, group)
        ret["changes"].setdefault("ca_bundle", {
            "reason": ["the signer's CA certificates changed"],
            "generations": [g["generation"] for g in cas]})
    if need_cert:
        _write(name, answer["certificate"], mode, user, group)
        cert = cx509.load_pem_x509_certificate(answer["certificate"].encode())
        ret["changes"]["certificate"].update(
            {"serial": format(cert.serial_number, "x"), "not_after": str(cert.not_valid_after_utc)}
        )
        ret["comment"] = (f"Agent certificate issued by {signer} (CA generation "
                          f"{cas[0]['generation']})")
    else:
        ret["comment"] = f"CA bundle (generations {_gens(cas)}) fetched from {signer}"
    return ret


# ---------------------------------------------------------------------------------------------
# ACLs
def _acl(name):
    return __utils__["apigee_mtls_acl." + name]


def _ids(user, group):
    """``(uid, gid)``, or ``(None, None)`` while the user does not exist yet (a test=True
    run on a fresh node previews the states that create it)."""
    import grp  # pylint: disable=import-outside-toplevel
    import pwd  # pylint: disable=import-outside-toplevel

    try:
        return pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid
    except KeyError:
        if __opts__["test"]:
            return None, None
        raise CommandExecutionError(f"user {user} or group {group} does not exist")


def _fix_owner_mode(path, user, group, mode):
    """Give an existing file its owner and mode (``mode`` an int) through Salt's file
    functions. Secret files are *created* by ``apigee_mtls_acl.write_secret`` instead, with
    plain ``os`` calls: it opens them with their final mode, so the secret is never readable
    by others, not even between a write and a chmod."""
    __salt__["file.chown"](path, user, group)
    __salt__["file.set_mode"](path, format(mode, "04o"))


def _file_problems(path, uid, gid, mode):
    if uid is None:
        return []
    try:
        st = os.stat(path)
    except OSError:
        return []
    bad = []
    if (st.st_uid, st.st_gid) != (uid, gid):
        bad.append(f"{path}: owner {st.st_uid}:{st.st_gid}, expected {uid}:{gid}")
    if st.st_mode & 0o777 != mode:
        bad.append(f"{path}: mode {oct(st.st_mode & 0o777)}, expected {oct(mode)}")
    return bad


def _token_problem(token, want_policies=None):
    """None when ``token`` is known to Consul (and linked to exactly ``want_policies``),
    else why not. Raises when the local agent cannot tell (no leader yet, not running)."""
    if not token:
        return "missing"
    try:
        me = _acl("api")("GET", "/v1/acl/token/self", token)
    except Exception as exc:  # pylint: disable=broad-except
        if getattr(exc, "status", None) in (401, 403) and "not found" in str(exc).lower():
            return "not known to Consul (the cluster's ACLs were re-created?)"
        raise
    names = sorted(p["Name"] for p in me.get("Policies") or [])
    if want_policies is not None and names != sorted(want_policies):
        return f"linked to policies {names}, expected {sorted(want_policies)} (stale rules)"
    return None


def _retrying(fn, wait, what):
    """fn() until it stops raising a ConsulError of a not-ready agent (no leader, not
    answering), at most ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return fn()
        except Exception as exc:  # pylint: disable=broad-except
            status = getattr(exc, "status", "x")
            if status == "x" or status in (400, 401, 403, 404) or time.monotonic() > deadline:
                raise
            log.debug("apigee_mtls: %s: %s, retrying", what, exc)
            time.sleep(2)


def acl_bootstrapped(name, nodes=None, user="consul", group="consul", wait=180):
    """
    Ensure the cluster's Consul ACL system is bootstrapped and ``name`` holds its management
    token (0600, owned by ``user``). Run it on the signer only: the management token lives
    there and nowhere else. The bootstrap happens once (``PUT /v1/acl/bootstrap``); later runs
    check the token with ``/v1/acl/token/self``. The token is never returned nor logged; it is
    written by ``apigee_mtls_acl.write_secret`` (created with mode 0600, never readable by
    others), a wrong owner or mode is fixed with ``file.chown``/``file.set_mode``.

    If the cluster was bootstrapped before but ``name`` is lost, the state fails and says how
    to recover (put the token back, or Consul's bootstrap reset). With ``test=True`` and a
    local agent that does not answer, it says it could not check.

    :param str name: path of the management token file
    :param list nodes: the active node ids: the formula's tokens and policies of any other
        node (removed or retired) are deleted, so a decommissioned host's token stops working
        (default ``None``: no pruning)
    :param str user: owner of the token file (default ``consul``)
    :param str group: group of the token file (default ``consul``)
    :param int wait: seconds to wait for a Consul leader (default 180)
    :return: a state return

    .. code-block:: yaml

        apigee-mtls-acl-bootstrapped:
          apigee_mtls.acl_bootstrapped:
            - name: /etc/consul.d/acl/management.token
            - nodes: [n1, n2, n3]
    """
    ret = _ret(name)
    uid, gid = _ids(user, group)
    token = _acl("read_token")(name)
    api = _acl("api")
    try:
        problem = _retrying(lambda: _token_problem(token), 0 if __opts__["test"] else wait,
                            "management token check")
    except Exception as exc:  # pylint: disable=broad-except
        ret["comment"] = f"cannot check the management token in {name}: {exc}"
        if not __opts__["test"]:
            ret["result"] = False
        else:
            # Consul not answering: neither "valid" nor "would bootstrap" can be said
            ret["comment"] = ("Could not check the management token in "
                              f"{name} (Consul: {exc}): the real run checks it")
        return ret
    if problem:
        ret["changes"]["management_token"] = {"reason": problem, "file": name}
    fix = _file_problems(name, uid, gid, 0o600) if not problem else []
    if fix:
        ret["changes"]["file"] = fix
    if __opts__["test"]:
        if ret["changes"]:
            ret["result"] = None
            ret["comment"] = ("Would bootstrap the ACL system and keep its management token in "
                              f"{name}" if problem else f"Would fix {name}")
        else:
            ret["comment"] = "ACL system bootstrapped; management token valid"
        # pruning needs the token: previewed only once it exists
        if not problem and nodes is not None:
            _prune_tokens(ret, token, nodes, dry=True)
        return ret
    if problem:
        def boot():
            return api("PUT", "/v1/acl/bootstrap")
        try:
            answer = _retrying(boot, wait, "ACL bootstrap")
        except Exception as exc:  # pylint: disable=broad-except
            ret["result"] = False
            ret["changes"] = {}
            if "no longer allowed" in str(exc):
                ret["comment"] = (
                    f"the cluster's ACLs were bootstrapped before, but {name} is {problem}: "
                    f"put the management token back into {name} (mode 0600), or reset the "
                    "bootstrap (Consul: write the reset index from the error below into "
                    "<data_dir>/acl-bootstrap-reset on the leader) and apply again. "
                    f"Consul said: {exc}")
            else:
                ret["comment"] = f"ACL bootstrap failed: {exc}"
            return ret
        token = answer["SecretID"]
        os.makedirs(os.path.dirname(name), exist_ok=True)
        _acl("write_secret")(name, token, uid, gid)
        ret["comment"] = f"ACL system bootstrapped; management token in {name}"
    else:
        if fix:
            _fix_owner_mode(name, user, group, 0o600)
        ret["comment"] = "ACL system bootstrapped; management token valid"
    if nodes is not None:
        try:
            _retrying(lambda: _prune_tokens(ret, token, nodes, dry=False), wait,
                      "stale node tokens")
        except Exception as exc:  # pylint: disable=broad-except
            ret["result"] = False
            ret["comment"] += f"; removing stale node tokens failed: {exc}"
    return ret


_NODE_TOKEN = "apigee_mtls node "


def _prune_tokens(ret, mgmt, nodes, dry):
    api = _acl("api")
    tokens = api("GET", "/v1/acl/tokens", mgmt) or []
    stale = sorted((t for t in tokens if (t.get("Description") or "").startswith(_NODE_TOKEN)
                    and t["Description"][len(_NODE_TOKEN):] not in nodes),
                   key=lambda t: t["Description"])
    if not stale:
        return
    ret["changes"]["removed_node_tokens"] = [t["Description"][len(_NODE_TOKEN):] for t in stale]
    if dry:
        ret["result"] = None
        ret["comment"] += "; would remove the tokens of nodes no longer in the pillar"
        return
    for tok in stale:
        api("DELETE", f"/v1/acl/token/{tok['AccessorID']}", mgmt)
        for pol in tok.get("Policies") or []:
            if pol["Name"].startswith("apigee-mtls-node-"):
                api("DELETE", f"/v1/acl/policy/{pol['ID']}", mgmt)
    ret["comment"] += f"; removed {len(stale)} stale node token(s)"


def local_token_managed(name, user="consul", group="consul", mode="0600"):
    """
    Ensure ``name`` holds a random token made here (a UUID): the Consul agent's local
    ``agent_master`` token, which never leaves the node and is never returned or logged.
    An existing one is kept; only its owner and mode are corrected (``file.chown``,
    ``file.set_mode``). A new one is written by ``apigee_mtls_acl.write_secret``, which
    creates the file with ``mode`` (a secret is never readable by others, not even between a
    write and a chmod).

    :param str name: path of the token file
    :param str user: owner (default ``consul``)
    :param str group: group (default ``consul``)
    :param str mode: octal mode (default ``"0600"``)
    :return: a state return

    .. code-block:: yaml

        apigee-mtls-config-agent-master-token-managed:
          apigee_mtls.local_token_managed:
            - name: /etc/consul.d/acl/agent-master.token
    """
    import uuid  # pylint: disable=import-outside-toplevel

    ret = _ret(name)
    uid, gid = _ids(user, group)
    mode = int(str(mode), 8)
    token = _acl("read_token")(name)
    fix = _file_problems(name, uid, gid, mode) if token else []
    if token and not fix:
        ret["comment"] = f"{name} holds a local token"
        return ret
    ret["changes"] = {"created": name} if not token else {"files": fix}
    if __opts__["test"]:
        ret["result"] = None
        ret["comment"] = f"Would {'create' if not token else 'fix'} {name}"
        return ret
    if not token:
        os.makedirs(os.path.dirname(name), exist_ok=True)
        _acl("write_secret")(name, str(uuid.uuid4()), uid, gid, mode)
        ret["comment"] = f"Local token created in {name}"
    else:
        _fix_owner_mode(name, user, group, mode)
        ret["comment"] = f"Fixed {name}'s owner and mode"
    return ret


def _ask_for_token(signer, pub):
    return __salt__["apigee_mtls.ask_signer"]("issue_acl_token", signer=signer, public_key=pub,
                                              view=_view())


def _agent_answers():
    """Whether the local Consul agent answers its HTTP API at all."""
    try:
        _acl("api")("GET", "/v1/status/leader", timeout=3)
    except Exception as exc:  # pylint: disable=broad-except
        return getattr(exc, "status", None) is not None
    return True


def acl_token_managed(name, private_key, replication_file=None, user="consul", group="consul",
                      mode="0600", wait=180, agent_required=True, signer=None, policy=None,
                      replication_policy=None):
    """
    Ensure ``name`` holds this node's Consul ACL token, known to Consul and linked to
    ``policy`` (write on its own services only; see the planner's ``acl_node_rules``); for a
    server of a secondary data center, ``replication_file`` the replication token too.

    A missing, unknown or stale token is asked from ``signer`` (``apigee_mtls.ask_signer``:
    the event bus and the master's reactor, then ``apigee_mtls.issue_acl_token``), which
    answers sealed to this node's agent public key; it is opened here with ``private_key``.
    Neither the token nor its ciphertext is in the return. Token files are written by
    ``apigee_mtls_acl.write_secret`` (created with their final mode); a wrong owner or mode
    is fixed with ``file.chown``/``file.set_mode``. With
    ``test=True`` and a local agent that does not answer, an existing token is reported as
    present but not checked.

    :param str name: path of the agent token file
    :param str private_key: path of this node's agent private key (opens the sealed answer)
    :param str replication_file: path of the replication token file (servers of a secondary
        data center; default ``None``: none)
    :param str user: owner of the token files (default ``consul``)
    :param str group: group of the token files (default ``consul``)
    :param str mode: octal mode of the token files (default ``"0600"``; ``"0640"`` when the
        sidecars run as another user of ``group``)
    :param int wait: seconds to wait for the agent to check a token, and for the signer to
        answer (default 180)
    :param bool agent_required: ``True`` (default): the local agent must answer, to check
        existing tokens. ``False`` for nodes whose tokens come before the agent's first start
        (servers of a secondary data center: the planner's ``acl:tokens_before_start``):
        while the agent is not running, missing tokens are still fetched and existing ones are
        kept unchecked (the next run checks them)
    :param str signer: minion id of the signer (default ``None``: the plan's)
    :param str policy: name of the policy the agent token must be linked to (default
        ``None``: the plan's ``acl:policy``)
    :param str replication_policy: name of the replication token's policy (default ``None``:
        the plan's)
    :return: a state return; without ``signer`` and ``policy``, ``result: False`` on a bad
        pillar or a minion not in it

    .. code-block:: yaml

        apigee-mtls-acl-agent-token-managed:
          apigee_mtls.acl_token_managed:
            - name: /etc/consul.d/acl/agent.token
            - private_key: /etc/consul.d/tls/agent-key.pem
            - signer: n1
            - policy: apigee-mtls-node-n4-0123456789
    """
    ret = _ret(name)
    if signer is None or policy is None or (replication_file and replication_policy is None):
        plan = _member_plan(ret)
        if plan is None:
            return ret
        if not plan["acl"].get("enabled"):
            ret["comment"] = "ACLs are disabled (apigee_mtls:acl:enabled)"
            return ret
        signer = signer or plan["signer"]
        policy = policy or plan["acl"]["policy"]
        replication_policy = replication_policy or plan["acl"]["replication_policy"]
    acl = {"policy": policy, "replication_policy": replication_policy}
    uid, gid = _ids(user, group)
    mode = int(str(mode), 8)
    files = {"agent": (name, [acl["policy"]])}
    if replication_file:
        files["replication"] = (replication_file, [acl["replication_policy"]])
    problems = {}
    unchecked = {}
    offline = not agent_required and not _agent_answers()
    for kind, (path, policies) in files.items():
        token = _acl("read_token")(path)
        if token is None:
            problems[kind] = "missing"
            continue
        if offline:
            continue  # checked by the next run, once the agent runs
        try:
            why = _retrying(lambda: _token_problem(token, policies),
                            0 if __opts__["test"] else wait, "token check")
        except Exception as exc:  # pylint: disable=broad-except
            if not __opts__["test"]:
                ret["result"] = False
                ret["comment"] = f"cannot check the {kind} token: {exc}"
                return ret
            # the agent is not up yet (test=True on a stopped node): the real run checks
            unchecked[kind] = str(exc)
            continue
        if why:
            problems[kind] = why
    fix = [p for path, _ in files.values() for p in _file_problems(path, uid, gid, mode)]
    if not problems and not fix:
        if unchecked:
            ret["comment"] = (f"ACL token present (policy {acl['policy']}); could not check "
                              "it with Consul ("
                              + "; ".join(f"{k}: {v}" for k, v in sorted(unchecked.items()))
                              + "): the real run checks it")
        elif offline:
            ret["comment"] = (f"ACL token present (policy {acl['policy']}); the agent is not "
                              "running: checked once it runs")
        else:
            ret["comment"] = f"ACL token valid (policy {acl['policy']})"
        return ret
    if problems:
        ret["changes"]["tokens"] = {k: {"reason": v, "policy": files[k][1][0]}
                                    for k, v in problems.items()}
    if fix:
        ret["changes"]["files"] = fix
    if __opts__["test"]:
        ret["result"] = None
        ret["comment"] = (f"Would ask {signer} for this node's ACL token"
                          if problems else "Would fix the token files' owner and mode")
        return ret
    if problems:
        key_pem = _read(private_key)
        if key_pem is None:
            ret["result"] = False
            ret["changes"] = {}
            ret["comment"] = f"private key {private_key} missing"
            return ret
        pub = __salt__["x509.get_public_key"](private_key)
        deadline = time.monotonic() + wait
        attempt = 0
        while True:
            answer = _ask_for_token(signer, pub)
            if isinstance(answer, dict) and answer.get("agent") and \
                    answer.get("policy") == acl["policy"] and \
                    (not replication_file or answer.get("replication")):
                break
            if isinstance(answer, dict) and answer.get("agent"):
                last = (f"the signer's policy {answer.get('policy')} differs from this "
                        f"node's {acl['policy']} (pillars not refreshed alike?)")
                retry = True
            else:
                last = answer.get("error") if isinstance(answer, dict) else answer
                retry = not isinstance(answer, dict) or bool(answer.get("retry")) or \
                    not answer.get("error")
            if not retry or time.monotonic() > deadline:
                ret["result"] = False
                ret["changes"] = {}
                ret["comment"] = f"signer {signer} issued no token: {last or 'no answer'}"
                return ret
            time.sleep(_retry_pause(attempt))
            attempt += 1
        os.makedirs(os.path.dirname(name), exist_ok=True)
        try:
            for kind, (path, _) in files.items():
                secret = _acl("unseal")(key_pem, answer[kind])
                # a policy change keeps the token's secret: the file stays as it is, so
                # that sidecars_current does not restart the sidecars that read it
                if _acl("read_token")(path) != secret.strip():
                    _acl("write_secret")(path, secret, uid, gid, mode)
                else:
                    _fix_owner_mode(path, user, group, mode)
        except ValueError as exc:
            ret["result"] = False
            ret["changes"] = {}
            ret["comment"] = f"the signer's answer does not open with {private_key}: {exc}"
            return ret
        ret["comment"] = f"ACL token issued by {signer} (policy {acl['policy']})"
    else:
        for path, _ in files.values():
            _fix_owner_mode(path, user, group, mode)
        ret["comment"] = "Token files' owner and mode fixed"
    return ret


# ---------------------------------------------------------------------------------------------
# The agent's configuration: reload what Consul reloads, restart only for the rest
_ACTION_TEXT = {"start": "reads it when it starts", "next_start": "reads it at its next start",
                "reload": "reloaded", "none": "is not touched",
                "restart": "restarts next (apigee_mtls.agent_current, without an outage)"}
#: where agent_config_managed leaves the keys that need the agent restarted
RESTART_MARKER = "/run/apigee-mtls/consul-restart-needed"
_WOULD = {"start": "would read it when it starts", "next_start": "would read it at its next "
          "start", "reload": "would reload", "restart": "would restart", "none": "unchanged"}


def _consul_reload(bin_path, token_file, attempts=15, interval=2):
    """``consul reload`` (returns once the agent re-read its files), with the agent's local
    master token from ``token_file``; retried while the agent is still starting."""
    env = {"CONSUL_HTTP_TOKEN_FILE": token_file} if token_file else {}
    res = None
    for _ in range(attempts):
        res = __salt__["cmd.run_all"]([bin_path, "reload", "-http-addr=127.0.0.1:8500"],
                                      env=env, python_shell=False, ignore_retcode=True)
        if res["retcode"] == 0:
            return None
        time.sleep(interval)
    return (res["stderr"] or res["stdout"]).strip()


def _rs(name):
    return __utils__["apigee_mtls_restart." + name]


def _main_pid(service):
    pid = __salt__["cmd.run_stdout"](["systemctl", "show", "-p", "MainPID", "--value", service],
                                     python_shell=False, ignore_retcode=True).strip()
    return int(pid) if pid.isdigit() and int(pid) > 0 else None


def _pairs(rules):
    """Hold rules as ``(chain, specification)``: a str is a specification for INPUT."""
    return [rule if isinstance(rule, tuple) else ("INPUT", rule) for rule in rules]


def _insert_held(rules):
    """Insert the hold rules ``rules`` first in their chains, each once (Salt's iptables
    module)."""
    for chain, rule in _pairs(rules):
        if __salt__["iptables.check"](table="filter", chain=chain, rule=rule) is not True:
            __salt__["iptables.insert"](table="filter", chain=chain, position=1, rule=rule)


def _hold(rules, on, timer=None, later=()):
    """Insert (``on``) or delete the SYN-hold rules first in their chain (Salt's iptables
    module): a rule is a specification for INPUT (str), or a ``(chain, specification)``
    pair. Inserting also arms a transient systemd timer that deletes them, and the rules
    ``later`` that the caller inserts itself later (:func:`_insert_held`), after 120 s,
    should this run die before it does, and returns its unit name; deleting stops that timer
    (when given), so that nothing of the hold is left behind. Deleting is one atomic
    ``iptables-restore --noflush`` (every held port opens at once, one process instead of
    six per rule through the module), or rule by rule through the module when that fails
    (a rule already gone, an ``iptables-restore`` without ``--wait``)."""
    pairs = _pairs(rules)
    if on:
        timer = "apigee-mtls-hold-expire-{}".format(int(time.time() * 1000))
        script = "; ".join("iptables -w -D {} {} 2>/dev/null".format(chain, rule)
                           for chain, rule in pairs + _pairs(later))
        __salt__["cmd.run_all"](
            ["systemd-run", "--collect", "--on-active=120", "--unit=" + timer,
             "/bin/sh", "-c", script + "; exit 0"], python_shell=False, ignore_retcode=True)
        _insert_held(pairs)
        return timer
    batch = "*filter\n{}COMMIT\n".format("".join("-D {} {}\n".format(c, r) for c, r in pairs))
    if pairs and __salt__["cmd.run_all"](
            ["iptables-restore", "--noflush", "--wait"], stdin=batch, python_shell=False,
            ignore_retcode=True, output_loglevel="quiet")["retcode"] != 0:
        for chain, rule in pairs:
            while __salt__["iptables.check"](table="filter", chain=chain, rule=rule) is True:
                __salt__["iptables.delete"](table="filter", chain=chain, rule=rule)
    if timer:
        __salt__["cmd.run_all"](["systemctl", "stop", timer + ".timer", timer + ".service"],
                                python_shell=False, ignore_retcode=True)
    return timer


def _drain(ports, minimum, cap=0.4):
    """Once new connections to ``ports`` are held, wait until the sidecars are done with the
    ones that arrived before (``apigee_mtls_restart.pending_connections``: none queued,
    none new with unread bytes, on two polls in a row 50 ms apart), at least ``minimum`` and at most
    ``cap`` seconds: under load a sidecar may read a ClientHello late, and its authorize
    must not meet a stopping agent. The cap is short: the whole hold must stay under the 3 s
    at which callers resend a dropped SYN a second time. Returns the seconds waited."""
    began = time.monotonic()
    time.sleep(minimum)
    quiet = 0
    while ports and quiet < 2 and time.monotonic() - began < cap:
        out = __salt__["cmd.run_stdout"](["ss", "-Htina"], python_shell=False,
                                         ignore_retcode=True)
        quiet = 0 if _rs("pending_connections")(out, ports) else quiet + 1
        if quiet < 2:
            time.sleep(0.05)
    return round(time.monotonic() - began, 2)


def _poll(check, wait, interval=0.05, done=bool):
    """Call ``check()`` until ``done`` holds for its value or ``wait`` seconds have passed,
    ``interval`` seconds apart; return its last value."""
    deadline = time.monotonic() + wait
    while True:
        value = check()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def _wait_listening(ports, wait, address=None, interval=0.05):
    """Wait until something listens on each TCP port of ``ports`` (``ss -Hltn``), at
    ``address`` or, when None, at any address, at most ``wait`` seconds; returns the ports
    still not listening (sorted; empty when every one is)."""
    def missing():
        out = __salt__["cmd.run_stdout"](["ss", "-Hltn"], python_shell=False,
                                         ignore_retcode=True)
        local = [line.split()[3] for line in out.splitlines() if len(line.split()) > 3]
        return sorted(
            p for p in ports
            if ("{}:{}".format(address, p) not in local if address else
                not any(addr.rsplit(":", 1)[-1] == str(p) for addr in local)))
    return _poll(missing, wait, interval, done=lambda left: not left)


def _authorizes(service, token):
    """Whether the local agent answers a Connect authorize for ``service`` now (what each new
    inbound connection of its sidecar needs; the first answer also fills the agent's
    intention and token caches)."""
    body = {"Target": service, "ClientCertURI":
            "spiffe://00000000-0000-0000-0000-000000000000.consul/ns/default/dc/x/svc/probe",
            "ClientCertSerial": "00"}
    try:
        _acl("api")("POST", "/v1/agent/connect/authorize", token, body=body, timeout=3)
        return True
    except Exception:  # pylint: disable=broad-except
        return False


def _agent_answers_authorize(services, token, wait):
    """Wait until the local agent answers a Connect authorize for each of ``services``;
    True when it did within ``wait`` seconds."""
    deadline = time.monotonic() + wait
    return all(_poll(lambda s=service: _authorizes(s, token),
                     max(0.0, deadline - time.monotonic()), 0.1)
               for service in services)


def _caught_up(token):
    """Whether this server has caught up with its leader now
    (``apigee_mtls_restart.caught_up`` on ``/v1/agent/self``)."""
    try:
        return bool(_rs("caught_up")(
            _acl("api")("GET", "/v1/agent/self", token, timeout=3)["Stats"]["raft"]))
    except Exception:  # pylint: disable=broad-except
        return False


def _resolve_path(service, datacenter):
    """The lookup Consul 1.8's proxy makes for each new upstream connection: passing
    instances, stale reads allowed (``connect/resolver.go``: ``AllowStale: true``)."""
    return "/v1/health/connect/{}?passing=1&stale&dc={}".format(service, datacenter)


def _resolves(upstream, token):
    """Whether the local agent answers a passing instance of ``upstream`` (``(service,
    datacenter)``) now: what an egress sidecar of Consul 1.8 asks it for each new
    connection."""
    try:
        return bool(_acl("api")("GET", _resolve_path(*upstream), token, timeout=3))
    except Exception:  # pylint: disable=broad-except
        return False


def _agent_resolves(upstreams, token):
    """The ``(service, datacenter)`` of ``upstreams`` the local agent resolves now."""
    return [u for u in upstreams if _resolves(u, token)]


def _agent_record(key, token):
    """A server's record (``{"sha256": <binary>, "state": <fingerprint>}``) or {}."""
    try:
        return _acl("api")("GET", "/v1/kv/{}?raw".format(key), token, timeout=5) or {}
    except Exception:  # pylint: disable=broad-except
        return {}


def _wanted_state(binary_sha, restart, unit_file):
    """The fingerprint of the agent state the files on disk describe, comparable between the
    servers of a data center (their own names and addresses left out)."""
    try:
        config = json.loads(_read(restart.get("config_file") or "") or b"{}")
    except ValueError:
        config = {}
    role = __utils__["apigee_mtls_plan.agent_config_role"](config, restart.get("node"),
                                                           restart.get("address"))
    return _rs("agent_state")(binary_sha, role.encode(), _read(unit_file or "") or b"")


def _restart_session(node, token, ttl):
    """A new session of ``node`` for the restart keys (ID): no health checks (the agent's own
    restart must not end it), its keys deleted with it, expiring after ``ttl`` unrenewed."""
    return _acl("api")("PUT", "/v1/session/create", token, body={
        "Name": "apigee-mtls restart " + node, "Node": node, "TTL": ttl, "Behavior": "delete",
        "LockDelay": "0s", "Checks": [], "NodeChecks": []}, timeout=5)["ID"]


def _kv_entries(query, token):
    """The entries of a KV read (``GET /v1/kv/<query>``), ``[]`` when there is no such key."""
    try:
        return _acl("api")("GET", "/v1/kv/" + query, token, timeout=5) or []
    except Exception as exc:  # pylint: disable=broad-except
        if getattr(exc, "status", None) == 404:
            return []
        raise


def _kv_holders(prefix, token):
    """The names (keys without ``prefix``) of the keys under a KV ``prefix`` that a session
    holds (a consistent read; a released key stays in the KV, unheld)."""
    return sorted(e["Key"][len(prefix):]
                  for e in _kv_entries(prefix + "?recurse&consistent", token)
                  if e.get("Session"))


class _RestartKeys:
    """What a server's restart lock and a client's restart slot share: a session of this
    node's (``_restart_session``, ``ttl``) that takes and gives back KV keys, renewed while
    it waits, destroyed at the end."""

    ttl = "60s"

    def __init__(self, restart, token):
        self.node, self.token, self.session = restart.get("node"), token, None
        self.servers = restart.get("servers") or []
        self.acls = bool(restart.get("token_file"))
        self.api = _acl("api")

    def _session(self):
        """Open the session, or renew it; True when it was just opened."""
        if self.session is None:
            self.session = _restart_session(self.node, self.token, self.ttl)
            return True
        self._renew()
        return False

    def _kv(self, key, verb):
        return self.api("PUT", "/v1/kv/{}?{}={}".format(key, verb, self.session), self.token,
                        body=self.node, timeout=5)

    def _renew(self):
        self.api("PUT", "/v1/session/renew/" + self.session, self.token, timeout=5)

    def _give_back(self, key, what):
        if self.session is None:
            return
        try:
            self._kv(key, "release")
            self.api("PUT", "/v1/session/destroy/" + self.session, self.token, timeout=5)
        except Exception as exc:  # pylint: disable=broad-except
            log.warning("apigee_mtls: %s not released (%s); its session expires", what, exc)
        self.session = None


class _RestartLock(_RestartKeys):
    """The data center's restart lock for Consul servers (see ``apigee_mtls_restart``): a
    session of this node's, a pending key, then the lock key, acquired when the cluster can
    lose this server and this node is not a leader with other servers still to restart."""

    def __init__(self, restart, token):
        super().__init__(restart, token)
        self.leader_wait = restart.get("leader_wait", 120)

    def _leader(self):
        addr = self.api("GET", "/v1/status/leader", timeout=5) or ""
        host = addr.rsplit(":", 1)[0]
        for member in self.api("GET", "/v1/catalog/nodes", self.token, timeout=5) or []:
            if member.get("Address") == host:
                return member.get("Node")
        return None

    def _pending(self):
        return _kv_holders(_rs("kv_keys")()["pending"], self.token)

    def _wait_clients(self, deadline):
        """Holding the lock: wait until no client agent restarts (none holds its ``clients``
        key); None, or the clients still restarting at ``deadline``."""
        while True:
            clients = _kv_holders(_rs("kv_keys")()["clients"], self.token)
            if not clients:
                return None
            if time.monotonic() > deadline:
                return "client agents restarting: " + ", ".join(clients)
            self._renew()
            time.sleep(0.3)

    def health_problem(self):
        """None when the data center's servers can lose one, else why not."""
        passing = [e.get("Node", {}).get("Address") for e in self.api(
            "GET", "/v1/health/service/consul?passing", self.token, timeout=5) or []]
        return _rs("cluster_can_lose_a_server")(
            self.api("GET", "/v1/status/leader", timeout=5) or "",
            self.api("GET", "/v1/status/peers", timeout=5) or [], passing, len(self.servers))

    def acquire(self, wait, want):
        """Take the lock; returns None, or why it could not within ``wait`` seconds.
        ``want``: the fingerprint of the state this server restarts into."""
        start = time.monotonic()
        deadline = start + wait
        why = "not tried"
        while time.monotonic() < deadline:
            try:
                if self._session():
                    self._kv(_rs("kv_keys")()["pending"] + self.node, "acquire")
                states = {}
                if time.monotonic() - start < self.leader_wait:
                    states = {n: _agent_record(_rs("kv_keys")()["binary"] + n, self.token)
                              .get("state") for n in self.servers if n != self.node}
                if _rs("leader_waits")(self.node, self._leader(), self._pending(), states,
                                       want):
                    why = "this server leads the data center: it restarts after the others"
                elif self._kv(_rs("kv_keys")()["lock"], "acquire") is True:
                    why = self.health_problem() or self._wait_clients(deadline)
                    if why is None:
                        # the clients' restarts took time: check the cluster again
                        why = self.health_problem()
                    if why is None:
                        return None
                    self._kv(_rs("kv_keys")()["lock"], "release")
                else:
                    why = "another server is restarting"
            except Exception as exc:  # pylint: disable=broad-except
                why = str(exc)
            time.sleep(1 + (hash(self.node) % 10) / 10.0)
        return why

    def wait_healthy(self, wait):
        """After the restart: wait until the cluster can lose a server again (this one is
        back as a healthy voter); returns None or the last reason."""
        deadline = time.monotonic() + wait
        why = "not checked"
        while time.monotonic() < deadline:
            try:
                self._renew()
                stats = (self.api("GET", "/v1/agent/self", self.token, timeout=5) or {}).get(
                    "Stats", {}).get("raft", {})
                if not _rs("raft_member_ready")(stats):
                    why = "this server is not back in raft yet ({})".format(
                        stats.get("state", "no raft state"))
                else:
                    members = self.api("GET", "/v1/agent/members", self.token, timeout=5)
                    why = (_rs("servers_unsettled")(members, [self.node],
                                                    self.acls).get(self.node)
                           or self.health_problem())
                if why is None:
                    return None
            except Exception as exc:  # pylint: disable=broad-except
                why = str(exc)
            time.sleep(1)
        return why

    def release(self):
        self._give_back(_rs("kv_keys")()["lock"], "restart lock")


def _record_agent(restart, token, service, unit_file):
    """A server records the sha256 of the binary its agent runs (``/proc/<pid>/exe``: the
    running image, even when the file was replaced since) and the fingerprint of its state
    (binary, consul.json, unit), once the agent runs what the files say."""
    pid = _main_pid(service)
    if pid is None:
        return
    sha = _rs("sha256_file")("/proc/{}/exe".format(pid))
    record = {"sha256": sha, "state": _wanted_state(sha, restart, unit_file)}
    key = _rs("kv_keys")()["binary"] + restart.get("node")
    if _agent_record(key, token) != record:
        _acl("api")("PUT", "/v1/kv/" + key, token, body=record, timeout=5)


def _servers_on_other_binary(servers, sha, token):
    shas = {server: _agent_record(_rs("kv_keys")()["binary"] + server, token).get("sha256")
            for server in servers}
    return _rs("clients_wait_for")(sha, shas)


class _RestartSlot(_RestartKeys):
    """A client agent's slot to restart (see ``apigee_mtls_restart.client_waits``): a session
    of this node's and its ``clients`` key, held from before the agent stops until it
    authorizes again, taken only when no server restarts or waits to, every server is
    alive and out of legacy ACL mode and, for a new binary (``binary_sha``), runs it."""

    ttl = "120s"

    def __init__(self, restart, token, binary_sha=None):
        super().__init__(restart, token)
        self.binary_sha = binary_sha
        self.key = _rs("kv_keys")()["clients"] + (self.node or "")

    def _lock_holder(self):
        entries = _kv_entries(_rs("kv_keys")()["lock"] + "?consistent", self.token)
        return (entries or [{}])[0].get("Session")

    def acquire(self, wait):
        """Take the slot; returns None, or why not within ``wait`` seconds. The key is
        taken before the servers' state is read, and given back when they are busy."""
        deadline = time.monotonic() + wait
        while True:
            try:
                self._session()
                if self._kv(self.key, "acquire") is not True:
                    why = "this node's restart key is held by another session"
                else:
                    members = self.api("GET", "/v1/agent/members", self.token, timeout=5)
                    why = _rs("client_waits")(
                        self._lock_holder(), _kv_holders(_rs("kv_keys")()["pending"], self.token),
                        _rs("servers_unsettled")(members, self.servers, self.acls),
                        _servers_on_other_binary(self.servers, self.binary_sha, self.token)
                        if self.binary_sha else [])
                    if why is None:
                        return None
                    self._kv(self.key, "release")
            except Exception as exc:  # pylint: disable=broad-except
                why = str(exc)
            if time.monotonic() > deadline:
                return why
            time.sleep(0.5 + (hash(self.node) % 5) / 10.0)

    def release(self):
        self._give_back(self.key, "restart key")


def _restart_agent(service, restart, unit_file=None, timings=None):
    """Restart the local agent as ``restart`` (the states' ``restart`` argument) says:
    a server under the data center's lock after a health check, new connections to and from
    this node's sidecars held while the agent is down. Returns None, or why it failed."""
    restart = restart or {}
    timings = {} if timings is None else timings
    token = _acl("read_token")(restart["token_file"]) if restart.get("token_file") else None
    wait = restart.get("wait", 600)
    slot = (_RestartSlot(restart, token, restart.get("binary_sha"))
            if not restart.get("server") and restart.get("servers") else None)
    lock = _RestartLock(restart, token) if restart.get("server") else None
    inbound = restart.get("hold_inbound") or []
    outbound = restart.get("hold_outbound") or []
    inbound_rules = _rs("hold_rules")(inbound)
    outbound_rules = _rs("hold_rules")(outbound)
    rpc_rules = (_rs("hold_rules")([restart["rpc_port"]], restart.get("rpc_peers") or [])
                 if restart.get("rpc_port") else [])
    # the sidecars' own asks to the agent wait for it too, from the stop (a handshake the
    # drain cannot see asks it after), released with the sidecars' ports once it authorizes
    agent_rules = ([("OUTPUT", r) for r in _rs("agent_hold_rules")(
        restart["agent_http_port"], restart["proxy_user"])]
        if restart.get("agent_http_port") and (inbound or outbound) else [])
    try:
        if slot is not None:
            began = time.monotonic()
            why = slot.acquire(wait)
            timings["servers_wait"] = round(time.monotonic() - began, 2)
            if why is not None:
                return "waited {} s for the servers: {}".format(wait, why)
        if lock is not None:
            bin_path = restart.get("bin_path")
            want = _wanted_state(_rs("sha256_file")(bin_path) if bin_path else "", restart,
                                 unit_file)
            began = time.monotonic()
            why = lock.acquire(wait, want)
            timings["lock_wait"] = round(time.monotonic() - began, 2)
            if why is not None:
                return "the restart lock was not free within {} s: {}".format(wait, why)
        # what the agent resolves now must resolve again before new connections go through
        resolved = _agent_resolves([tuple(u) for u in restart.get("resolve_upstreams") or []],
                                   token)
        still_held = inbound_rules + outbound_rules + rpc_rules
        timer = _hold(still_held, True, later=agent_rules) if still_held else None
        held = time.monotonic()

        def release(group, timing, since):
            """Open ``group`` (the rest stays held) and record when under ``timing``."""
            if group:
                _hold(group, False)
            still_held[:] = [r for r in still_held if r not in group]
            timings[timing] = round(time.monotonic() - since, 2)

        try:
            # connections accepted just before the hold may still be asking the agent (an
            # authorize, a resolve): let them finish before it stops
            timings["drain"] = _drain(inbound + outbound, restart.get("drain", 0.2))
            if agent_rules:
                _insert_held(agent_rules)
                inbound_rules += agent_rules
                still_held += agent_rules
            if not __salt__["service.restart"](service):
                return "systemctl restart {} failed".format(service)
            timings["restart"] = round(time.monotonic() - held, 2)
            # each held port is released as soon as its sidecar can serve again: callers
            # resend a held SYN after 1 s, then every second (Linux's
            # net.ipv4.tcp_syn_linear_timeouts) or 2 s later (older kernels), and give up at
            # their connect timeout (5 s for the DataStax driver)
            if not _agent_answers_authorize(restart.get("authorize_services") or [], token,
                                            60):
                return "the restarted agent does not authorize connections after 60 s"
            if inbound_rules:
                release(inbound_rules, "held_inbound", held)
            # a server's RPC port opens once it has caught up with its leader (before, it
            # answers the other agents' stale lookups from the snapshot it restored: "no
            # healthy instances found"; its raft peers reach it through the hold); the
            # upstream listeners once the agent resolves again, with the proxy's own stale
            # lookup, every upstream it resolved before (a destination down since before
            # does not count). Each is bounded, and neither waits for the other: a leader's
            # restart waits for an election before it catches up, which its own egress,
            # served from its state, need not.
            if rpc_rules:
                _wait_listening([restart["rpc_port"]], 10)
            rpc_wait = restart.get("catch_up_wait", 10) if rpc_rules else None
            resolve_wait = restart.get("resolve_wait", 10)
            pending = list(resolved)
            began = time.monotonic()
            while rpc_wait is not None or resolve_wait is not None:
                waited = time.monotonic() - began
                if rpc_wait is not None and (_caught_up(token) or waited > rpc_wait):
                    if waited > rpc_wait:
                        timings["not_caught_up"] = True
                    release(rpc_rules, "catch_up", began)
                    rpc_wait = None
                if resolve_wait is not None:
                    pending = [u for u in pending if not _resolves(u, token)]
                    if not pending or waited > resolve_wait:
                        if pending:
                            timings["unresolved"] = ["{} ({})".format(*u) for u in pending]
                        release(outbound_rules, "resolve", began)
                        resolve_wait = None
                if rpc_wait is not None or resolve_wait is not None:
                    time.sleep(0.05)
        finally:
            _hold(still_held, False, timer)
            timings["held"] = round(time.monotonic() - held, 2)
        if lock is not None:
            began = time.monotonic()
            why = lock.wait_healthy(120)
            timings["healthy_after"] = round(time.monotonic() - began, 2)
            if why is not None:
                return "the servers are not healthy 120 s after this restart: " + why
            _record_agent(restart, token, service, unit_file)
        return None
    finally:
        for held_key in (lock, slot):
            if held_key is not None:
                held_key.release()


def agent_config_managed(name, config, user="root", group="consul", mode="0640",
                         bin_path="/usr/local/bin/consul", token_file=None, service="consul",
                         restart_marker=RESTART_MARKER):
    """
    Ensure the Consul agent's configuration file ``name`` holds ``config``, and that the
    running agent uses it with as little disruption as Consul allows: a change of keys that
    Consul 1.8 re-reads on ``consul reload`` (the log level, TLS settings, ...) reloads the
    agent, which keeps its PID and every connection; a change of keys read only at start
    (``retry_join``, ``bootstrap_expect``, ...) waits for the next start; any other change
    restarts it. The planner's ``agent_config_action`` decides; ``changes`` says which keys
    changed and what the agent does, and ``test=True`` previews it.

    :param str name: the file (``/etc/consul.d/consul.json``)
    :param dict config: its content
    :param str user: owner of the file
    :param str group: its group (the agent's)
    :param str mode: its mode
    :param str bin_path: the consul binary (for ``consul reload``)
    :param str token_file: a token file allowed to reload the agent (its local master
        token), with ACLs
    :param str service: the agent's systemd unit
    :param str restart_marker: a change that needs a restart is written here (the keys), for
        :py:func:`agent_current` to restart the agent without an outage later in the run
        (servers one at a time, after this node's token is current); a file, so that a run
        that stops in between leaves it for the next one
    :raises: nothing; a failed write, reload or restart is ``result: False``

    .. code-block:: yaml

        apigee-mtls-config-agent-file-managed:
          apigee_mtls.agent_config_managed:
            - name: /etc/consul.d/consul.json
            - config: {"log_level": "INFO", "server": false}
            - token_file: /etc/consul.d/acl/agent-master.token
    """
    ret = _ret(name)
    text = _read(name)
    old = None
    if text is not None:
        try:
            old = json.loads(text)
        except ValueError:
            old = {}  # unreadable: every key differs
    decision = __utils__["apigee_mtls_plan.agent_config_action"](old, config)
    written = __states__["file.serialize"](name=name, dataset=config, serializer="json",
                                           user=user, group=group, mode=mode)
    if written["result"] is False:
        return dict(written, name=name)
    action = decision["action"]
    if action in ("reload", "restart") and not __salt__["service.status"](service):
        action = "start"  # not running: it reads the file when it starts
    if not written["changes"] and action == "none":
        ret["comment"] = f"{name} is up to date"
        return ret
    ret["changes"] = dict(written["changes"])
    if action != "none":
        ret["changes"]["consul"] = {"keys": decision["keys"], "agent": action}
    if __opts__["test"]:
        ret["result"] = None
        ret["comment"] = f"Would update {name}; Consul {_WOULD[action]}"
        return ret
    if action == "reload":
        error = _consul_reload(bin_path, token_file)
        if error:
            ret["result"] = False
            ret["comment"] = f"{name} updated, but consul reload failed: {error}"
            return ret
    elif action == "restart":
        __salt__["file.mkdir"](os.path.dirname(restart_marker), mode="0700")
        marked = __salt__["file.write"](restart_marker, json.dumps(decision["keys"]))
        if not str(marked).startswith("Wrote"):
            ret["result"] = False
            ret["comment"] = f"{name} updated, but {restart_marker} not written: {marked}"
            return ret
    ret["comment"] = f"{name} updated; Consul {_ACTION_TEXT[action]}" + (
        f" ({', '.join(decision['keys'])})" if action != "none" else "")
    return ret


def agent_current(name, bin_path, unit_file, restart=None, restart_marker=RESTART_MARKER,
                  binary_hash=None):
    """
    Ensure the running Consul agent (systemd unit ``name``) runs the installed binary and
    unit file: it is restarted when the image it runs (``/proc/<pid>/exe``) differs from
    ``bin_path``, when ``unit_file`` changed after it started, or when
    :py:func:`agent_config_managed` left keys that need a restart in ``restart_marker``.
    This is how a new
    ``consul:install`` source rolls out: servers restart one at a time under the data
    center's restart lock (healthy cluster first, the leader last) and record the binary they
    run in Consul's KV (``apigee_mtls/binary/<node>``); a client restarts onto a new binary
    once every server of its data center runs it. While an agent restarts, new connections to
    its sidecars, its upstream listeners and, on a server, its RPC port are held (their SYNs
    dropped, so that callers retry them after 1 s) instead of refused. Sidecars are not
    restarted.

    :param str name: the agent's systemd unit (``consul``)
    :param str bin_path: the installed Consul binary
    :param str unit_file: the unit's file
    :param dict restart: ``node`` (this node's Consul name), ``server`` (bool), ``servers``
        (the data center's servers), ``token_file`` (this node's ACL token: lock, records,
        authorize), ``hold_inbound`` (its sidecars' public ports, int list: released once
        the agent authorizes again), ``hold_outbound`` (its upstream listeners, int list:
        released once it also resolves again), ``rpc_port`` (a server's RPC port, held
        until the agent listens again and has caught up with its leader, at most
        ``catch_up_wait`` seconds, default 10, or None), ``rpc_peers`` (the data center's
        other servers: their SYNs to it pass the hold, so that raft reaches it),
        ``authorize_services`` (this node's services: the restarted agent must authorize for
        each), ``resolve_upstreams`` (``[service,
        datacenter]`` of its upstreams: those the agent resolved to a passing instance before
        the restart must resolve again before the release, at most ``resolve_wait`` seconds,
        default 10), ``config_file`` (``consul.json``),
        ``wait`` (seconds to wait for the lock or the servers, default 600),
        ``leader_wait`` (seconds the leader waits for the other servers, default 120)
    :param str restart_marker: the file :py:func:`agent_config_managed` writes (removed once
        the agent restarted)
    :param str binary_hash: ``sha256=<hex>`` of the binary the pillar installs (``binary``
        method), so that ``test=True`` previews the restart of a binary change before the
        file is replaced
    :raises: nothing; a failed restart, or a lock or servers that stay busy past ``wait``,
        is ``result: False``

    .. code-block:: yaml

        apigee-mtls-service-current:
          apigee_mtls.agent_current:
            - name: consul
            - bin_path: /usr/local/bin/consul
            - unit_file: /etc/systemd/system/consul.service
            - restart:
                node: n2
                server: true
                token_file: /etc/consul.d/acl/agent.token
                hold_inbound: [10001]
                hold_outbound: [10002]
    """
    ret = _ret(name)
    restart = restart or {}
    pid = _main_pid(name)
    if pid is None:
        ret["comment"] = f"{name} is not running: it starts with the installed binary"
        return ret
    why = []
    new_sha = _rs("sha256_file")(bin_path)
    if __opts__["test"] and binary_hash and binary_hash.lower().startswith("sha256="):
        new_sha = binary_hash.split("=", 1)[1].lower()  # the file is not replaced in test mode
    if _rs("sha256_file")(f"/proc/{pid}/exe") != new_sha:
        why.append("binary")
    if _started_before(name, unit_file):
        why.append("unit file")
    marker = _read(restart_marker)
    if marker is not None:
        why.append("configuration")
    token = _acl("read_token")(restart["token_file"]) if restart.get("token_file") else None
    if not why:
        if restart.get("server") and not __opts__["test"]:
            try:
                _record_agent(restart, token, name, unit_file)
            except Exception as exc:  # pylint: disable=broad-except
                log.warning("apigee_mtls: agent record not written (%s)", exc)
        ret["comment"] = f"{name} runs the installed binary and unit"
        return ret
    ret["changes"] = {"restarted": {"because": why, "server": bool(restart.get("server"))}}
    if __opts__["test"]:
        ret["result"] = None
        ret["comment"] = f"Would restart {name} ({', '.join(why)} changed)" + (
            ": servers one at a time, the leader last" if restart.get("server") else "")
        return ret
    timings = {}
    error = _restart_agent(name, dict(restart, bin_path=bin_path,
                                      binary_sha=new_sha if "binary" in why else None),
                           unit_file, timings)
    ret["changes"]["restarted"]["seconds"] = timings
    if error and "drain" not in timings:
        ret["changes"] = {}  # it waited in vain: nothing was held nor restarted
        ret["result"] = False
        ret["comment"] = f"Not restarted {name}: {error}"
        return ret
    if error:
        ret["result"] = False
        ret["comment"] = f"Restarting {name} failed: {error}"
        return ret
    if marker is not None:
        os.remove(restart_marker)
    ret["comment"] = f"Restarted {name} ({', '.join(why)} changed)"
    return ret


def _started_before(unit, path):
    """Whether systemd ``unit`` is running and started before ``path`` was last written."""
    out = __salt__["cmd.run_stdout"](
        ["systemctl", "show", "-p", "ActiveState", "-p", "ExecMainStartTimestampMonotonic",
         unit], python_shell=False)
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    if props.get("ActiveState") != "active":
        return False
    try:
        started = float(props.get("ExecMainStartTimestampMonotonic") or 0) / 1e6
        written = time.monotonic() - (time.time() - os.stat(path).st_mtime)
    except (OSError, ValueError):
        return False
    return 0 < started < written


def sidecars_current(name, units):
    """
    Ensure the running sidecar proxies use the current ACL token file ``name``: a sidecar
    reads its token once, when it starts, so one that started before the file was last
    written (the signer issued this node a new token: it had been removed from the pillar and
    added back, or its token was lost) would keep presenting a deleted token ("ACL not
    found") and every flow through it would fail. Those sidecars are restarted.

    :param str name: the node's ACL token file (its sidecars' ``CONSUL_HTTP_TOKEN_FILE``)
    :param list units: the sidecars' systemd units
    :raises: nothing; a failed restart is ``result: False``

    .. code-block:: yaml

        apigee-mtls-mesh-sidecars-token-current:
          apigee_mtls.sidecars_current:
            - name: /etc/consul.d/acl/agent.token
            - units: [apigee-mtls-proxy@egress-10-77-0-14]
    """
    ret = _ret(name)
    stale = [unit for unit in units if _started_before(unit, name)]
    if not stale:
        ret["comment"] = f"Every running sidecar started after {name} was written"
        return ret
    ret["changes"] = {"restarted": stale}
    if __opts__["test"]:
        ret["result"] = None
        ret["comment"] = f"Would restart {len(stale)} sidecars started before {name} changed"
        return ret
    failed = [unit for unit in stale if not __salt__["service.restart"](unit)]
    if failed:
        ret["result"] = False
        ret["changes"] = {"restarted": [u for u in stale if u not in failed]}
        ret["comment"] = "Could not restart " + ", ".join(failed)
        return ret
    ret["comment"] = f"Restarted {len(stale)} sidecars onto the token in {name}"
    return ret


def sidecar_listeners_managed(name, unit, listener, upstreams=None, wait=20):
    """
    Ensure a sidecar proxy serves its planned listeners with as little disruption as Consul
    1.8's built-in proxy allows, and keep their record in ``name``. The proxy binds its
    public listener once, at start, but opens a listener for each new upstream port live,
    when its registration changes (the agent reloaded the services file before this state),
    and never closes one. So a sidecar whose upstreams are added, removed or moved to a free
    port keeps running, every connection through it included: this state waits until the
    new ports listen. It is stopped (``service.running`` starts it again, after every
    sidecar that must stop has stopped, so that listeners can swap ports) only when its
    public listener changes, when a new port is still held by it for another destination,
    or when a new port does not listen within ``wait`` seconds. The planner's
    ``sidecar_listener_action`` decides; ``test=True`` says which would restart.

    :param str name: the sidecar's listener record (JSON, 0644)
    :param str unit: the sidecar's systemd unit (``apigee-mtls-proxy@<service>``)
    :param dict listener: its public listener: ``address``, ``port``,
        ``local_service_address``, ``local_service_port``; for an egress sidecar also
        ``local_bind_address``, its upstream listeners' address (kept in the record: what
        ``apigee_mtls.egress_drained`` counts connections on)
    :param dict upstreams: {destination service: local port (int)}, empty for an ingress
        sidecar
    :param int wait: seconds to wait for new upstream ports to listen
    :raises: nothing; a failed write or stop is ``result: False``

    .. code-block:: yaml

        apigee-mtls-mesh-proxy-egress-10-77-0-14-listener-managed:
          apigee_mtls.sidecar_listeners_managed:
            - name: /var/lib/apigee-mtls/listeners/egress-10-77-0-14.json
            - unit: apigee-mtls-proxy@egress-10-77-0-14
            - listener: {address: 10.77.0.14, port: 10704,
                         local_service_address: 127.0.0.1, local_service_port: 10704}
            - upstreams: {qpid-5672-10-77-0-14: 10400}
    """
    ret = _ret(name)
    upstreams = {k: int(v) for k, v in (upstreams or {}).items()}
    text = _read(name)
    try:
        old = json.loads(text) if text is not None else None
    except ValueError:
        old = None
    running = bool(__salt__["service.status"](unit))
    action = _rs("sidecar_listener_action")(old, listener, upstreams, running)
    if action["record"] == old:
        ret["comment"] = f"{unit}'s listeners are as planned"
        return ret
    before = {k: v for k, v in (old or {}).items() if k != "bound"}
    after = {k: v for k, v in action["record"].items() if k != "bound"}
    if before != after:
        ret["changes"]["listeners"] = {"old": before or None, "new": after}
    if action["restart"]:
        ret["changes"]["restart"] = action["restart"]
    if not ret["changes"]:
        ret["changes"]["record"] = "the ports the running proxy holds"
    if __opts__["test"]:
        ret["result"] = None
        ret["comment"] = ("Would restart {}: {}".format(unit, "; ".join(action["restart"]))
                          if action["restart"] else
                          "Would update {}'s listeners live".format(unit))
        return ret
    written = __states__["file.serialize"](name=name, dataset=action["record"],
                                           serializer="json", mode="0644")
    if written["result"] is False:
        return dict(written, name=name)
    if not action["restart"] and action["bind"]:
        missing = _wait_listening(action["bind"], wait, interval=0.2,
                                  address=listener.get("local_bind_address", "127.0.0.1"))
        if missing:
            action["restart"] = ["ports {} did not listen within {} s".format(missing, wait)]
            ret["changes"]["restart"] = action["restart"]
            # started again on the plan: record only what it will bind
            __states__["file.serialize"](name=name, dataset=_rs("sidecar_listener_action")(
                None, listener, upstreams, False)["record"], serializer="json", mode="0644")
    if action["restart"]:
        if not __salt__["service.stop"](unit):
            ret["result"] = False
            ret["comment"] = f"Could not stop {unit} for its move"
            return ret
        ret["comment"] = "Stopped {} (started again on its new listeners): {}".format(
            unit, "; ".join(action["restart"]))
        return ret
    ret["comment"] = "Updated {}'s listeners live{}".format(
        unit, ": {} listen".format(action["bind"]) if action["bind"] else "")
    return ret


# ---------------------------------------------------------------------------------------------
# An egress identity change without a failed connection: the new proxy starts next to the old
# one (its upstreams bind another loopback address); the nat rules move new connections to it
# once it reaches everything the old one reaches; the old one stops when it carries none
def _read_json(path):
    """A JSON file's content, None when missing or unreadable."""
    text = _read(path)
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def _egress_units():
    """The egress sidecar units that run or are enabled, as service IDs."""
    prefix = "apigee-mtls-proxy@egress-"
    units = set(__salt__["service.get_running"]()) | set(__salt__["service.get_enabled"]())
    return sorted(u[len("apigee-mtls-proxy@"):].replace(".service", "")
                  for u in units if u.startswith(prefix))


def _write_draining(path, services, group):
    """Write (or remove, when empty) the draining file; its definitions carry the node's ACL
    token as the services file's do, so its content is never shown."""
    if not services:
        if os.path.exists(path):
            os.remove(path)
        return
    _write(path, json.dumps({"services": services}, indent=4, sort_keys=True), "0640", "root",
           group)


def egress_draining(name, services_file, planned_id, group="consul"):
    """
    Ensure a previous egress instance of this node stays registered while its proxy still
    runs: before the services file is rewritten for a new egress identity (the move from
    per-node to role identities, a new component set), its definition is copied from the
    services file into the draining file ``name``, which the agent loads too. Its proxy keeps
    serving the connections it carries, and the signer keeps its intentions
    (``apigee_mtls.intentions_managed`` keeps those of registered identities);
    ``apigee_mtls.egress_drained`` stops it once it carries none. The decision is
    ``apigee_mtls_restart.draining_egress``.

    :param str name: the draining file (a Consul config file, 0640, in the config dir)
    :param str services_file: the mesh's services file, as the previous run left it
    :param str planned_id: the planned egress instance ID
    :param str group: the file's group (the Consul agent's)
    :raises: nothing; a failed write is ``result: False``

    .. code-block:: yaml

        apigee-mtls-mesh-egress-draining:
          apigee_mtls.egress_draining:
            - name: /etc/consul.d/apigee-mtls-draining.json
            - services_file: /etc/consul.d/apigee-mtls-services.json
            - planned_id: egress-ms-ui-10-77-0-16
    """
    ret = _ret(name)
    active = [sid for sid in _egress_units()
              if __salt__["service.status"]("apigee-mtls-proxy@" + sid)]
    old = _read_json(name)
    keep = _rs("draining_egress")(_read_json(services_file), old, planned_id, active)
    before = sorted(svc["id"] for svc in (old or {}).get("services") or [])
    after = [svc["id"] for svc in keep]
    if before == after:
        ret["comment"] = ("{} stay registered while their proxies drain".format(
            ", ".join(after)) if after else "No previous egress instance to keep registered")
        return ret
    ret["changes"] = {"draining": {"old": before, "new": after}}
    if __opts__["test"]:
        ret["result"] = None
        ret["comment"] = "Would keep {} registered while their proxies drain".format(
            ", ".join(after) or "nothing")
        return ret
    try:
        _write_draining(name, keep, group)
    except OSError as exc:
        ret["result"] = False
        ret["changes"] = {}
        ret["comment"] = f"Could not write {name}: {exc}"
        return ret
    ret["comment"] = "Keeping {} registered while their proxies drain".format(
        ", ".join(after) or "nothing")
    return ret


def _probe_all(targets, timeout):
    """{key: ok} of ``apigee_mtls.probe_upstream`` for {key: (address, port)}, in parallel."""
    if not targets:
        return {}
    probe = __salt__["apigee_mtls.probe_upstream"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, len(targets))) as pool:
        futures = {key: pool.submit(probe, port, address, timeout)
                   for key, (address, port) in targets.items()}
    return {key: future.result()["ok"] for key, future in futures.items()}


def _nat_targets(chain):
    """The addresses the live nat chain sends connections to (``--to-destination``)."""
    out = __salt__["cmd.run_stdout"](["iptables", "-w", "-t", "nat", "-S", chain],
                                     python_shell=False, ignore_retcode=True)
    return {line.split("--to-destination ", 1)[1].rsplit(":", 1)[0]
            for line in out.splitlines() if "--to-destination " in line} | (
        {"127.0.0.1"} if " REDIRECT " in out else set())


def egress_switch_ready(name, bind_address, upstreams, draining_file, chain="APIGEE-MTLS-OUT",
                        wait=120, probe_timeout=1.0):
    """
    Ensure new connections can move to this node's egress proxy ``name`` without one
    failing: when a previous egress proxy still carries this node's connections (the draining
    file lists it) and the nat rules still send new ones to it, wait until every upstream
    that answers through the old proxy answers through the new one too (the signer has
    written the new identity's intentions), probing both with ``apigee_mtls.probe_upstream``.
    Requisite of the firewall state: if it fails, the rules do not move and the old proxy
    keeps serving. Nothing to wait for on a fresh node or once the rules have moved.

    :param str name: the planned egress instance ID
    :param str bind_address: its upstream listeners' address
    :param dict upstreams: {destination service: local port}
    :param str draining_file: the draining file (``apigee_mtls.egress_draining``)
    :param str chain: the formula's nat chain
    :param int wait: seconds to wait for the new proxy's listeners and intentions
    :param float probe_timeout: seconds each probe waits for the mesh to close it
    :raises: nothing; ``result: False`` names the upstreams still refused

    .. code-block:: yaml

        apigee-mtls-firewall-egress-switch-ready:
          apigee_mtls.egress_switch_ready:
            - name: egress-ms-ui-10-77-0-16
            - bind_address: 127.108.152.23
            - upstreams: {zk-2181-10-77-0-11: 10001}
            - draining_file: /etc/consul.d/apigee-mtls-draining.json
    """
    ret = _ret(name)
    upstreams = {dest: int(port) for dest, port in (upstreams or {}).items()}
    old = [svc for svc in (_read_json(draining_file) or {}).get("services") or []]
    old_binds = {}
    for svc in old:
        proxy = ((svc.get("connect") or {}).get("sidecar_service") or {}).get("proxy") or {}
        for up in proxy.get("upstreams") or []:
            old_binds.setdefault(up["destination_name"], (
                up.get("local_bind_address") or "127.0.0.1", int(up["local_bind_port"])))
    if not old or not upstreams:
        ret["comment"] = "No previous egress proxy carries this node's connections"
        return ret
    targets = _nat_targets(chain)
    if targets and targets <= {bind_address}:
        ret["comment"] = f"New connections already go to {name} ({bind_address})"
        return ret
    if __opts__["test"]:
        ret["result"] = None
        ret["comment"] = ("Would wait until {} reaches every upstream that {} reaches, then let "
                          "the nat rules move new connections to it".format(
                              name, ", ".join(svc["id"] for svc in old)))
        return ret
    deadline = time.monotonic() + wait
    missing = _wait_listening(sorted(upstreams.values()), wait, address=bind_address,
                              interval=0.2)
    if missing:
        ret["result"] = False
        ret["comment"] = (f"{name}'s upstream listeners {missing} did not listen on "
                          f"{bind_address} within {wait} s; new connections stay on the "
                          "previous egress proxy")
        return ret
    while True:
        new = _probe_all({d: (bind_address, p) for d, p in upstreams.items()}, probe_timeout)
        refused = [d for d in sorted(new) if not new[d]]
        if refused:
            before = _probe_all({d: old_binds[d] for d in refused if d in old_binds},
                                probe_timeout)
            refused = _rs("switch_refusals")({d: new[d] for d in refused}, before)
        if not refused:
            ret["comment"] = (f"{name} reaches all {len(upstreams)} upstreams the previous "
                              "proxy reaches: new connections can move to it")
            return ret
        if time.monotonic() > deadline:
            ret["result"] = False
            ret["comment"] = (
                "{} is still refused by {} of its upstreams ({}) that the previous proxy "
                "reaches: its intentions are not written yet (the signer writes them: apply "
                "apigee_mtls there). New connections stay on the previous egress proxy".format(
                    name, len(refused), ", ".join(refused[:5])))
            return ret
        time.sleep(1)


def egress_drained(name, planned_id, listener_dir, bin_path, token_file=None,
                   chain="APIGEE-MTLS-OUT", group="consul"):
    """
    Ensure no egress proxy of this node other than the planned one (``planned_id``) runs once
    it carries no connection: after the nat rules moved new connections to the planned one,
    each previous egress proxy is stopped and disabled as soon as no established connection
    uses its upstream listeners (``apigee_mtls_restart.egress_connections``), its listener
    record removed and its definition dropped from the draining file ``name`` (the agent
    reloads: the instance leaves the catalog, and the signer's next run removes its
    intentions). One that still carries connections keeps running; a later run stops it.
    A proxy the nat rules still send connections to is never stopped.

    :param str name: the draining file (``apigee_mtls.egress_draining``)
    :param str planned_id: the planned egress instance ID
    :param str listener_dir: the sidecars' listener records' directory
    :param str bin_path: the consul binary (``consul reload``)
    :param str token_file: the token ``consul reload`` uses (the agent's local master token)
    :param str chain: the formula's nat chain
    :param str group: the draining file's group (the Consul agent's)
    :raises: nothing; a failed stop is ``result: False``

    .. code-block:: yaml

        apigee-mtls-firewall-egress-drained:
          apigee_mtls.egress_drained:
            - name: /etc/consul.d/apigee-mtls-draining.json
            - planned_id: egress-ms-ui-10-77-0-16
            - listener_dir: /var/lib/apigee-mtls/listeners
            - bin_path: /usr/bin/consul
    """
    ret = _ret(name)
    draining = (_read_json(name) or {}).get("services") or []
    ids = sorted(set(sid for sid in _egress_units() if sid != planned_id)
                 | {svc["id"] for svc in draining})
    if not ids:
        ret["comment"] = "No previous egress proxy runs"
        return ret
    sockets = _established(ret)
    if sockets is None:
        return ret
    targets = _nat_targets(chain)
    stop, busy = [], {}
    for sid in ids:
        record = _read_json(os.path.join(listener_dir, sid + ".json"))
        address, _ = _rs("egress_listeners")(record)
        count = _rs("egress_connections")(record, sockets)
        if address in targets:
            busy[sid] = "the nat rules still send new connections to it"
        elif count:
            busy[sid] = f"{count} connections open"
        else:
            stop.append(sid)
    note = "; ".join(f"{sid} keeps running: {why}" for sid, why in sorted(busy.items()))
    if not stop:
        ret["comment"] = note
        return ret
    ret["changes"] = {"stopped": ["apigee-mtls-proxy@" + sid for sid in stop]}
    if __opts__["test"]:
        ret["result"] = None
        ret["comment"] = "Would stop {} (no connection left){}".format(
            ", ".join(ret["changes"]["stopped"]), "; " + note if note else "")
        return ret
    failed = []
    for sid in stop:
        unit = "apigee-mtls-proxy@" + sid
        if not __salt__["service.stop"](unit):
            failed.append(unit)
            continue
        __salt__["service.disable"](unit)
        record = os.path.join(listener_dir, sid + ".json")
        if os.path.exists(record):
            os.remove(record)
    left = [svc for svc in draining if svc["id"] not in stop or
            "apigee-mtls-proxy@" + svc["id"] in failed]
    if len(left) != len(draining):
        try:
            _write_draining(name, left, group)
        except OSError as exc:
            failed.append(f"{name}: {exc}")
        problem = _consul_reload(bin_path, token_file)
        if problem:
            failed.append(f"consul reload: {problem}")
    if failed:
        ret["result"] = False
        ret["changes"] = {"stopped": [u for u in ret["changes"]["stopped"] if u not in failed]}
        ret["comment"] = "Could not stop or deregister: " + ", ".join(failed)
        return ret
    ret["comment"] = "Stopped {} (no connection left){}".format(
        ", ".join(ret["changes"]["stopped"]), "; " + note if note else "")
    return ret


# ---------------------------------------------------------------------------------------------
# Connect leaf certificates (the end of a state run: can this node's sidecars get one?)
NO_INTERMEDIATE = "no PEM-encoded data found"
NOT_JOINED = "No known Consul servers"


def _leaf_problem(service, token):
    """None when the local agent issues a Connect leaf certificate for ``service``, else
    Consul's reason."""
    try:
        leaf = _acl("api")("GET", f"/v1/agent/connect/ca/leaf/{service}", token, timeout=15)
    except Exception as exc:  # pylint: disable=broad-except
        return str(exc)
    if not isinstance(leaf, dict) or not leaf.get("CertPEM"):
        return "the agent answered without a certificate"
    return None


def _leads(address):
    """Whether the local agent is its data center's Consul leader (server RPC port 8300)."""
    try:
        return _acl("api")("GET", "/v1/status/leader", timeout=5) == f"{address}:8300"
    except Exception:  # pylint: disable=broad-except
        return False


def _leaf_failure_cause(problem, datacenter, primary_datacenter, servers):
    """
    Explain why a data center's Connect CA does not issue leaf certificates, from Consul's
    error text ``problem``, and say what to do.

    :param str problem: the error of ``GET /v1/agent/connect/ca/leaf/<service>``
    :param str datacenter: the node's data center
    :param str primary_datacenter: the primary data center
    :param list servers: the Consul servers (minion ids) of ``datacenter``
    :return: one sentence (str)
    """
    if NO_INTERMEDIATE in problem and datacenter != primary_datacenter:
        return (
            f"the Connect CA of data center {datacenter} has no intermediate certificate "
            f"signed by the primary data center {primary_datacenter}: its leader initialised "
            "it while the primary refused to sign (Consul 1.8 logs \"Primary datacenter "
            "refused to sign our intermediate CA certificate\" and asks again only on a "
            "leader change, or after max_query_time, 10 min). Apply apigee_mtls on "
            f"{datacenter}'s Consul servers ({', '.join(servers)}): the leader restarts, "
            "and the next one re-initialises the CA with its replication token")
    if "ACL not found" in problem or "Permission denied" in problem:
        return ("this node's ACL token is not accepted: apply apigee_mtls on this node "
                "again (it asks the signer for a new one)")
    return (f"data center {datacenter}'s Connect CA did not issue it (servers: "
            f"{', '.join(servers)}); see `journalctl -u consul` on its leader")


def connect_leaf_ready(name, token_file=None, datacenter="dc-1", primary_datacenter="dc-1",
                       servers=(), heal_secondary_ca=False, address=None, wait=90,
                       heal_after=20, join_wait=20):
    """
    Ensure the local Consul agent can obtain a Connect leaf certificate for service ``name``
    (what every sidecar needs to serve mTLS), so that a state run which leaves this node's
    mesh unable to work does not report success. It waits up to ``wait`` seconds (a new
    cluster's CA initialises during the run), then fails with the cause and what to do.

    Consul 1.8's secondary data centers have one known way to end up without a working CA:
    their leader's request to the primary to sign its intermediate was refused, and Consul
    does not retry it by itself for 10 minutes. With ``heal_secondary_ca`` (a server of a
    secondary data center), the node that leads its data center restarts its agent once,
    after ``heal_after`` seconds of that error, so that another server re-initialises the
    CA; the restart is reported in ``changes``.

    :param str name: the service whose leaf is requested (the node's egress service)
    :param str token_file: the node's ACL token file (default ``None``: no ACLs)
    :param str datacenter: the node's data center (for messages; default ``dc-1``)
    :param str primary_datacenter: the primary data center (for messages; default ``dc-1``)
    :param list servers: the Consul servers of ``datacenter`` (minion ids, for messages)
    :param bool heal_secondary_ca: restart the agent if it leads a secondary data center
        whose CA has no intermediate (default ``False``)
    :param str address: the node's IP (to recognise the leader, ``<address>:8300``)
    :param int wait: seconds to wait for a leaf before failing (default 90)
    :param int heal_after: seconds of the no-intermediate error before healing (default 20)
    :param int join_wait: seconds after which an agent that has not joined its cluster ("No
        known Consul servers": a node just added, whose peers have not applied yet) is left
        to the next run with a comment instead of failing (default 20)
    :return: a state return

    .. code-block:: yaml

        apigee-mtls-mesh-leaf-certificate-ready:
          apigee_mtls.connect_leaf_ready:
            - name: egress-10-77-0-17
            - token_file: /etc/consul.d/acl/agent.token
            - datacenter: dc-2
            - primary_datacenter: dc-1
            - servers: [n7, n8, n9]
            - heal_secondary_ca: True
            - address: 10.77.0.17
    """
    ret = _ret(name)
    token = _acl("read_token")(token_file) if token_file else None
    problem = _leaf_problem(name, token)
    if problem is None:
        ret["comment"] = f"Connect leaf certificate for {name} issued in {datacenter}"
        return ret
    would_heal = heal_secondary_ca and NO_INTERMEDIATE in problem and _leads(address)
    if __opts__["test"]:
        if not _agent_answers():
            ret["comment"] = ("Consul does not run yet: the leaf certificate is checked "
                              "by the real run")
            return ret
        if would_heal:
            ret["changes"]["consul"] = {"restart": f"leader of {datacenter}, to "
                                                   "re-initialise its Connect CA"}
        ret["result"] = None
        ret["comment"] = (f"Connect leaf certificate for {name} not issued now ({problem}); "
                          "the real run waits for it"
                          + (" and would restart this leader" if would_heal else ""))
        return ret
    start = time.monotonic()
    healed = False
    while problem is not None and time.monotonic() - start < wait:
        if NOT_JOINED in problem and time.monotonic() - start >= join_wait:
            # a node just added to the pillar: its peers' firewalls admit it when they apply
            # (README, "add a node"); nothing of the running mesh is broken
            ret["comment"] = (f"no Connect leaf certificate for {name} yet: this agent has not "
                              f"joined the cluster ({problem}). A node just added is admitted "
                              "when its peers apply apigee_mtls (README: add a node); the "
                              "next run and apigee_mtls.verify check its leaf")
            return ret
        if (heal_secondary_ca and not healed and NO_INTERMEDIATE in problem
                and time.monotonic() - start >= heal_after and _leads(address)):
            log.warning("apigee_mtls: %s's Connect CA has no intermediate: restarting "
                        "its leader (this node)", datacenter)
            __salt__["service.restart"]("consul")
            healed = True
            ret["changes"]["consul"] = {
                "restarted": f"leader of {datacenter}, to re-initialise its Connect CA "
                             "(it had no intermediate from the primary)"}
        time.sleep(3)
        problem = _leaf_problem(name, token)
    if problem is None:
        ret["comment"] = (f"Connect leaf certificate for {name} issued in {datacenter}"
                          + (" after restarting its leader" if healed else ""))
        return ret
    ret["result"] = False
    ret["comment"] = (f"no Connect leaf certificate for {name} after {wait} s: {problem}. "
                      + _leaf_failure_cause(problem, datacenter, primary_datacenter,
                                           servers))
    return ret


def _fingerprint_pem(pem):
    from cryptography.hazmat.primitives import hashes  # pylint: disable=import-outside-toplevel

    cert = cx509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
    return cert, cert.fingerprint(hashes.SHA256()).hex()


def connect_ca_managed(name, root_cert, key_pillar, token_file, wait=120):
    """
    Ensure Consul's Connect CA (the mesh root) is the organisation's CA ``root_cert``, with
    its private key read from pillar ``key_pillar`` here (so it is in neither the rendered
    SLS nor the job's arguments), through ``/v1/connect/ca/configuration`` with the
    management token in ``token_file``. Consul cross-signs the old root and re-issues every
    leaf certificate; the sidecars pick them up without a restart. Run it on the signer.

    :param str name: an identifier for the state (not a path)
    :param str root_cert: the organisation's CA certificate (PEM)
    :param str key_pillar: pillar path of its private key (unencrypted PEM, EC or RSA)
    :param str token_file: path of the management token file
    :param int wait: seconds to retry while Consul's answer is lost or the new root is not
        active yet (default 120)
    :return: a state return; ``result: False`` when the key is missing, not the
        certificate's, of another type, or Consul refuses the configuration

    .. code-block:: yaml

        apigee-mtls-connect-ca-managed:
          apigee_mtls.connect_ca_managed:
            - name: connect-ca
            - root_cert: {{ pillar.apigee_mtls.connect_ca.root_cert | json }}
            - key_pillar: apigee_mtls:secrets:connect_ca_key
            - token_file: /etc/consul.d/acl/management.token
    """
    ret = _ret(name)
    api = _acl("api")
    _, want = _fingerprint_pem(root_cert)
    token = _acl("read_token")(token_file)
    active = None
    if token:
        try:
            roots = _retrying(lambda: api("GET", "/v1/connect/ca/roots", token),
                              0 if __opts__["test"] else wait, "CA roots")
            active = next((r for r in roots.get("Roots") or [] if r.get("Active")), None)
        except Exception as exc:  # pylint: disable=broad-except
            if not __opts__["test"]:
                ret["result"] = False
                ret["comment"] = f"cannot read the Connect CA roots: {exc}"
                return ret
    elif not __opts__["test"]:
        ret["result"] = False
        ret["comment"] = f"no management token in {token_file}"
        return ret
    have = _fingerprint_pem(active["RootCert"])[1] if active else None
    if have == want:
        ret["comment"] = f"The mesh root is the organisation's CA (sha256 {want[:16]})"
        return ret
    ret["changes"]["root"] = {"old": have and f"sha256 {have[:16]}", "new": f"sha256 {want[:16]}"}
    if __opts__["test"]:
        ret["result"] = None
        ret["comment"] = "Would make the organisation's CA the mesh root"
        return ret
    key = __salt__["pillar.get"](key_pillar, None, unmask=True)
    if not key:
        ret["result"] = False
        ret["changes"] = {}
        ret["comment"] = (f"pillar {key_pillar} is missing on {__opts__['id']}: the signer "
                          "needs the private key of connect_ca:root_cert")
        return ret
    from cryptography.hazmat.primitives import serialization as ser  # pylint: disable=C0415
    from cryptography.hazmat.primitives.asymmetric import ec, rsa  # pylint: disable=C0415

    try:
        priv = ser.load_pem_private_key(key.encode(), password=None)
    except Exception:  # pylint: disable=broad-except
        ret["result"] = False
        ret["changes"] = {}
        ret["comment"] = f"pillar {key_pillar} is not an unencrypted PEM private key"
        return ret
    cert, _ = _fingerprint_pem(root_cert)
    pub = lambda k: k.public_bytes(ser.Encoding.DER,  # noqa: E731
                                   ser.PublicFormat.SubjectPublicKeyInfo)
    if pub(priv.public_key()) != pub(cert.public_key()):
        ret["result"] = False
        ret["changes"] = {}
        ret["comment"] = (f"pillar {key_pillar} is not the private key of "
                          "connect_ca:root_cert")
        return ret
    if isinstance(priv, ec.EllipticCurvePrivateKey):
        kind, bits = "ec", priv.curve.key_size
    elif isinstance(priv, rsa.RSAPrivateKey):
        kind, bits = "rsa", priv.key_size
    else:
        ret["result"] = False
        ret["changes"] = {}
        ret["comment"] = f"pillar {key_pillar}: Consul takes an EC or RSA key only"
        return ret
    # A root change makes the leader cross-sign and rotate: the answer can be lost (the
    # agent closed the connection, a leader change). Setting it again is harmless, so retry
    # on those until the active root is ours; a refusal (4xx) is final.
    deadline = time.monotonic() + wait
    while True:
        try:
            conf = api("GET", "/v1/connect/ca/configuration", token)
            config = dict(conf.get("Config") or {})
            config.update({"PrivateKey": key, "RootCert": root_cert, "PrivateKeyType": kind,
                           "PrivateKeyBits": bits})
            api("PUT", "/v1/connect/ca/configuration", token,
                {"Provider": "consul", "Config": config}, timeout=60)
            last = None
        except Exception as exc:  # pylint: disable=broad-except
            last = str(exc).replace(key.strip(), "<key>")
            if getattr(exc, "status", None) is not None and exc.status < 500:
                break
        try:
            roots = api("GET", "/v1/connect/ca/roots", token)
            active = next((r for r in roots.get("Roots") or [] if r.get("Active")), None)
            if active and _fingerprint_pem(active["RootCert"])[1] == want:
                ret["comment"] = ("The organisation's CA is now the mesh root; Consul "
                                  "re-issues the leaves")
                return ret
        except Exception as exc:  # pylint: disable=broad-except
            last = last or str(exc)
        if time.monotonic() > deadline:
            break
        time.sleep(2)
    ret["result"] = False
    ret["changes"] = {}
    ret["comment"] = f"Consul did not take the CA configuration: {last or 'root not active'}"
    return ret


# ---------------------------------------------------------------------------------------------
# intentions (Consul 1.8: the UUID-based /v1/connect/intentions API)
def _consul(url):
    host, _, port = url.rpartition(":")
    return consul.Consul(host=host.split("//")[-1], port=int(port), scheme="http")


def _client(ret, url):
    """A py-consul client for the local agent, or None with ``ret`` set to a failure."""
    if not HAS_CONSUL:
        ret["result"] = False
        ret["comment"] = "py-consul is not installed on this minion"
        return None
    return _consul(url)


def _list_intentions(client, token=None):
    # ?consistent: right after servers restart (a config change applied to every node at
    # once), a default-mode read can be served by a new leader that has not applied the
    # latest writes yet; it then missed an intention that existed, and creating it again
    # failed with "duplicate intention found" (seen in the lab). A consistent read waits for
    # the leader to be ready, or fails and is retried.
    headers = client.prepare_headers(token)
    return client.http.get(CB.json(), "/v1/connect/intentions", params=[("consistent", "")],
                           headers=headers) or []


def _registered_sources(client, token, names, members=None):
    """Which of ``names`` have an instance in some data center's catalog, on one of
    ``members`` (node names; None: on any node)."""
    headers = client.prepare_headers(token)
    found = set()
    for dc in client.http.get(CB.json(), "/v1/catalog/datacenters", headers=headers) or []:
        for name in sorted(set(names) - found):
            instances = client.http.get(CB.json(), f"/v1/catalog/service/{name}",
                                        params=[("dc", dc)], headers=headers) or []
            if any(members is None or i.get("Node") in members for i in instances):
                found.add(name)
    return found


def intentions_managed(name, intentions=None, url="http://127.0.0.1:8500", wait=120,
                       token=None, token_file=None, keep_registered=True, members=None):
    """
    Ensure the cluster has exactly the given intentions among those managed by this formula
    (marked with ``Meta: {managed-by: apigee_mtls}``). Missing ones are created (allows first,
    then the default deny, so that no allowed flow is ever refused during a rollout), wrong
    actions are corrected, stale managed ones are removed. Unmanaged intentions for the same
    pair are adopted; other unmanaged intentions are left alone. A write Consul refuses fails
    the state with its error; ``changes`` then lists what was written before it.

    A stale allow whose source identity is no longer planned but still has instances in a
    catalog is kept (the comment counts them): an egress proxy whose node moved to a new
    identity (the move from per-node to role identities, a node's new component set) keeps
    its old instance registered until its connections have closed, and must still reach its
    upstreams until then. The next run after that removes it. A planned identity's stale
    allow (its destination left the plan) is removed at once.

    :param str name: an identifier for the state (not a path)
    :param list intentions: ``[{"source", "destination", "action"}, ...]`` (``action``:
        ``allow`` or ``deny``); default ``None``: computed here from this minion's pillar
        (``apigee_mtls.intentions``), so that the rendered SLS does not carry them
    :param bool keep_registered: keep stale allows of identities with registered instances
        (default ``True``)
    :param list members: the cluster's nodes (Consul node names): only an instance on one of
        them keeps its identity's allows (a node removed from the pillar, never cleaned,
        stays in the catalog until it is forced out); default ``None``: any node
    :param str url: the local Consul agent's HTTP address (default
        ``http://127.0.0.1:8500``)
    :param int wait: seconds to wait for a Consul leader (default 120)
    :param str token: Consul ACL token to write with (default ``None``)
    :param str token_file: file holding that token, read here (default ``None``; wins over
        ``token``)
    :return: a state return

    .. code-block:: yaml

        apigee-mtls-intentions-managed:
          apigee_mtls.intentions_managed:
            - token_file: /etc/consul.d/acl/management.token
    """
    ret = _ret(name)
    if intentions is None:
        intentions = _pillar_call(ret, "apigee_mtls.intentions")
        if intentions is None:
            return ret
    if token_file:
        token = _acl("read_token")(token_file)
    client = _client(ret, url)
    if client is None:
        return ret
    deadline = time.monotonic() + (0 if __opts__["test"] else wait)
    while True:
        try:
            current = _list_intentions(client, token)
            break
        except Exception as exc:  # pylint: disable=broad-except
            if __opts__["test"]:
                # fresh cluster: nothing to compare with yet; everything would be created
                ret["result"] = None
                ret["changes"] = {"created": sorted(
                    f"{i['source']} -> {i['destination']} ({i['action']})" for i in intentions)}
                ret["comment"] = (
                    f"Would create {len(intentions)} intentions (Consul not reachable yet: {exc})"
                )
                return ret
            if time.monotonic() > deadline:
                ret["result"] = False
                ret["comment"] = f"Consul did not answer with a leader in {wait}s: {exc}"
                return ret
            time.sleep(2)
    by_pair = {(i["SourceName"], i["DestinationName"]): i for i in current}
    want = {(i["source"], i["destination"]): i["action"] for i in intentions}
    create, update, delete = [], [], []
    for pair, action in want.items():
        have = by_pair.get(pair)
        if have is None:
            create.append(pair)
        elif have["Action"] != action or (have.get("Meta") or {}).get("managed-by") != MANAGED_BY:
            update.append(pair)
    for pair, have in by_pair.items():
        if pair not in want and (have.get("Meta") or {}).get("managed-by") == MANAGED_BY:
            delete.append(pair)
    kept = []
    # only identities the plan no longer has: a planned role's stale allow (a destination
    # that left) goes at once
    planned = {source for source, _ in want}
    candidates = {p[0] for p in delete if p[0] not in planned
                  and by_pair[p]["Action"] == "allow"}
    if candidates and keep_registered:
        try:
            registered = _registered_sources(client, token, candidates,
                                             None if members is None else set(members))
        except Exception as exc:  # pylint: disable=broad-except
            ret["result"] = False
            ret["comment"] = f"Could not read the catalog to see which identities drain: {exc}"
            return ret
        kept = [p for p in delete if p[0] in candidates and p[0] in registered]
        delete = [p for p in delete if p not in kept]
    kept_note = ""
    if kept:
        kept_note = "; kept {} allows of {} still registered (draining): {}".format(
            len(kept), "identity" if len({p[0] for p in kept}) == 1 else "identities",
            ", ".join(sorted({p[0] for p in kept})))

    def fmt(pairs):
        return sorted(f"{s} -> {d} ({want.get((s, d), 'remove')})" for s, d in pairs)

    for key, pairs in (("created", create), ("updated", update), ("removed", delete)):
        if pairs:
            ret["changes"][key] = fmt(pairs)
    if not ret["changes"]:
        ret["comment"] = f"{len(want)} intentions in place{kept_note}"
        return ret
    if __opts__["test"]:
        ret["result"] = None
        ret["comment"] = (
            f"Would create {len(create)}, update {len(update)}, remove {len(delete)} "
            f"intentions{kept_note}"
        )
        return ret
    headers = client.prepare_headers(token)

    def body(pair):
        return json.dumps(
            {
                "SourceName": pair[0],
                "DestinationName": pair[1],
                "SourceType": "consul",
                "Action": want[pair],
                "Description": "managed by apigee_mtls",
                "Meta": {"managed-by": MANAGED_BY},
            }
        )

    def write(pair):
        if pair in delete:
            client.http.delete(
                CB.boolean(), f"/v1/connect/intentions/{by_pair[pair]['ID']}", headers=headers
            )
        elif pair in by_pair:
            client.http.put(
                CB.boolean(), f"/v1/connect/intentions/{by_pair[pair]['ID']}",
                data=body(pair), headers=headers,
            )
        else:
            client.http.post(CB.json(), "/v1/connect/intentions", data=body(pair), headers=headers)

    # in waves, each written in parallel (Consul 1.8 has no batch write for intentions; its
    # transaction API does not cover them): allows, then denies (a new default deny must
    # never precede the allows it guards), then removals
    writes = create + update
    waves = [sorted(p for p in writes if want[p] != "deny"),
             sorted(p for p in writes if want[p] == "deny"), sorted(delete)]
    done = []
    for wave in waves:
        failed = None
        with concurrent.futures.ThreadPoolExecutor(max_workers=INTENTION_WRITERS) as pool:
            futures = [(pair, pool.submit(write, pair)) for pair in wave]
            for pair, future in futures:
                try:
                    future.result()
                    done.append(pair)
                except Exception as exc:  # pylint: disable=broad-except
                    failed = failed or (pair, exc)
        if failed:
            # report what was written, and what failed: the next run does the rest
            pair, exc = failed
            ret["result"] = False
            ret["changes"] = {}
            for key, pairs in (("created", create), ("updated", update), ("removed", delete)):
                written = [p for p in pairs if p in done]
                if written:
                    ret["changes"][key] = fmt(written)
            ret["comment"] = (f"Writing intention {pair[0]} -> {pair[1]} failed: {exc}; "
                              f"{len(done)} of {len(create) + len(update) + len(delete)} "
                              "written")
            return ret
    ret["comment"] = (
        f"Created {len(create)}, updated {len(update)}, removed {len(delete)} "
        f"intentions{kept_note}"
    )
    return ret


# ---------------------------------------------------------------------------------------------
# firewall chains
def _chain_change(key, status):
    """What rebuilding would change in one ``firewall_status`` entry (``{}``: nothing)."""
    want, live = status["want"], status["live"]
    change = {}
    if want is None:  # firewall:ipv6 false: only the formula's own leftovers go
        if live is not None or status["jump"]:
            change["chain"] = "remove"
        return change
    if live is None:
        change = {"chain": "create", "rules": len(want)}
    elif live != want:
        added = [r for r in want if r not in live]
        removed = [r for r in live if r not in want]
        change = {"added": added, "removed": removed} if (added or removed) else {
            "reordered": True}
    if not status["jump"]:
        change["jump"] = f"{status['parent']} -> {key.split(':')[-1]}"
    return change


def firewall_managed(name, rules_file, apply_cmd, rules6_file=None, firewall=None):
    """
    Ensure the formula's iptables chains (nat ``APIGEE-MTLS-OUT`` jumped from OUTPUT, filter
    ``APIGEE-MTLS-IN`` jumped from INPUT) and ip6tables chains (filter ``APIGEE-MTLS-IN``
    jumped from INPUT, ``APIGEE-MTLS-OUT`` from OUTPUT) hold exactly the rules of
    ``firewall``.

    The live chains are compared rule by rule with ``firewall``; when they differ (or the
    jumps are missing) ``apply_cmd`` rebuilds them from ``rules_file`` and ``rules6_file``
    (passed to it as ``APIGEE_MTLS_RULES`` and ``APIGEE_MTLS_RULES6``) atomically
    (``iptables-restore``/``ip6tables-restore --noflush``: only the formula's chains are
    flushed, no other rule is touched). On a host without IPv6 (or without ``ip6tables``) the
    IPv6 part is skipped and the comment says so. Without IPv6 rules (``firewall:ipv6``
    false), IPv6 chains the formula made earlier are removed, nothing more.

    :param str name: an identifier for the state (not a path)
    :param str rules_file: path of the ``iptables-restore`` payload (written beforehand, e.g.
        by ``file.managed`` with the plan's ``iptables_restore``)
    :param str apply_cmd: the command that applies the files (the formula's
        ``apigee-mtls-firewall apply``), run without a shell
    :param str rules6_file: path of the ``ip6tables-restore`` payload; required when
        ``firewall`` has IPv6 rules (default ``None``: no IPv6 rules)
    :param dict firewall: the plan's ``firewall``: ``{"nat": [rules], "filter": [rules],
        "ip6": {"input": [rules], "output": [rules]} or None}`` in ``iptables -S`` form
        (default ``None``: this minion's plan)
    :return: a state return; ``result: False`` when ``apply_cmd`` fails, IPv6 rules come
        without ``rules6_file``, or (without ``firewall``) the pillar is invalid

    .. code-block:: yaml

        apigee-mtls-firewall-chains-managed:
          apigee_mtls.firewall_managed:
            - rules_file: /etc/apigee-mtls/iptables.rules
            - rules6_file: /etc/apigee-mtls/ip6tables.rules
            - apply_cmd: /usr/local/sbin/apigee-mtls-firewall apply
            - firewall: {{ plan.firewall | json }}
    """
    ret = _ret(name)
    if firewall is None:
        plan = _member_plan(ret)
        if plan is None:
            return ret
        firewall = plan["firewall"]
    if firewall.get("ip6") is not None and not rules6_file:
        ret["result"] = False
        ret["comment"] = "rules6_file is required: the firewall has IPv6 rules"
        return ret
    skipped = set()
    for key, status in __salt__["apigee_mtls.firewall_status"]({"firewall": firewall}).items():
        if status.get("skipped"):
            skipped.add(status["skipped"])
            continue
        change = _chain_change(key, status)
        if change:
            ret["changes"][key] = change
    note = "".join(f"; IPv6 firewall skipped: {why}" for why in sorted(skipped))
    if not ret["changes"]:
        ret["comment"] = "Firewall chains match the plan" + note
        return ret
    if __opts__["test"]:
        ret["result"] = None
        ret["comment"] = "Would rebuild the apigee_mtls firewall chains" + note
        return ret
    # the firewall script reads its rules files from these variables (an empty RULES6: no
    # IPv6 rules, the formula's own IPv6 chains are removed)
    env = {"APIGEE_MTLS_RULES": rules_file, "APIGEE_MTLS_RULES6": rules6_file or ""}
    out = __salt__["cmd.run_all"](apply_cmd, python_shell=False, env=env)
    if out["retcode"] != 0:
        ret["result"] = False
        ret["comment"] = f"{apply_cmd} failed: {out['stderr'] or out['stdout']}"
        return ret
    files = rules_file + (f" and {rules6_file}" if firewall.get("ip6") is not None
                          and not skipped else "")
    ret["comment"] = "Rebuilt the apigee_mtls firewall chains from " + files + note
    return ret


# ---------------------------------------------------------------------------------------------
# established connections of nodes that left the pillar
#: every established TCP socket (no -H: older ss lack it; the parser skips the header)
SS_ESTABLISHED = ["ss", "-tn", "state", "established"]


def _plan_util(name):
    return __utils__["apigee_mtls_plan." + name]


def _ss(args):
    """``cmd.run_all`` of an ss command; a missing binary is an answer, not an exception."""
    try:
        return __salt__["cmd.run_all"](args, python_shell=False, ignore_retcode=True)
    except CommandExecutionError as exc:
        return {"retcode": 127, "stdout": "", "stderr": str(exc)}


def _established(ret):
    """This host's established TCP sockets (parsed), or None with ``ret`` set to a failure."""
    out = _ss(SS_ESTABLISHED)
    if out["retcode"] != 0:
        ret["result"] = False
        ret["comment"] = f"{' '.join(SS_ESTABLISHED)} failed: " + (
            out["stderr"] or out["stdout"]).strip()
        return None
    return _plan_util("parse_ss_established")(out["stdout"])


def _four_tuple(sock):
    return (sock["local_ip"], sock["local_port"], sock["peer_ip"], sock["peer_port"])


def stale_connections_closed(name, ports, members):
    """
    Ensure no established TCP connection from a host that is not a cluster member remains on
    a port only members may reach (Consul's and this node's sidecar ports): the connections
    a node removed from the pillar had opened. Consul checks intentions only at the TLS
    handshake, so they would outlive its removal; ``APIGEE-MTLS-IN`` refuses their packets
    from the moment it is rebuilt, and this state closes the sockets (``ss -K``: the kernel
    resets them, the peer gets a RST). Run it after the firewall chains are in place, so the
    removed node cannot reconnect in between.

    The sockets come from ``ss -tn state established``; the planner's
    ``stale_connections`` picks the ones to close; each is closed by an ``ss -K`` filter
    naming both of its addresses and ports, then the sockets are listed again: one still
    there was not closed (``ss -K`` skips silently what the kernel cannot close, e.g. without
    ``CONFIG_INET_DIAG_DESTROY``). ``changes`` lists the connections as ``<peer>:<port> ->
    :<local port>`` (``{"closed": ["10.77.0.15:43210 -> :21001"]}``).

    :param str name: an identifier for the state (not a path)
    :param list ports: the ports to police: the plan's ``firewall:member_ports``
    :param list members: the members' IP addresses: the plan's ``firewall:members``
        (loopback is always allowed, an IPv4-mapped IPv6 peer counts as its IPv4)
    :return: a state return: ``result: True`` without changes when nothing is to close,
        ``None`` in test mode ("Would close ..."), ``False`` when ss cannot list the sockets
        or a connection could not be closed (ss's error, or "still open")
    :raises: nothing; ss failures are ``result: False``

    .. code-block:: yaml

        apigee-mtls-firewall-stale-connections-closed:
          apigee_mtls.stale_connections_closed:
            - ports: [8300, 8301, 8302, 8500, 8501, 8502, 8503, 8600, 10001, 10700]
            - members: [10.77.0.11, 10.77.0.12, 10.77.0.13]
            - require:
              - apigee_mtls: apigee-mtls-firewall-chains-managed
    """
    ret = _ret(name)
    sockets = _established(ret)
    if sockets is None:
        return ret
    stale = _plan_util("stale_connections")(sockets, ports, members)
    if not stale:
        ret["comment"] = "No connection from a non-member on Consul or sidecar ports"
        return ret
    label = _plan_util("connection_label")
    labels = {_four_tuple(sock): label(sock) for sock in stale}
    ret["changes"] = {"closed": sorted(labels.values())}
    if __opts__["test"]:
        ret["result"] = None
        ret["comment"] = (f"Would close {len(stale)} connection(s) from non-members: "
                          + ", ".join(ret["changes"]["closed"]))
        return ret
    errors, said = {}, {}
    for sock in stale:
        out = _ss(_plan_util("ss_kill_args")(sock))
        if out["retcode"] != 0:
            errors[_four_tuple(sock)] = (out["stderr"] or out["stdout"]).strip()
        elif out["stderr"].strip():  # e.g. "SOCK_DESTROY answers: ..." with exit code 0
            said[_four_tuple(sock)] = out["stderr"].strip()
    after = _established(ret)
    if after is None:  # result False: what ss -K accepted, unchecked
        done = sorted(text for key, text in labels.items() if key not in errors)
        ret["changes"] = {"closed": done} if done else {}
        ret["comment"] = (f"ss -K ran for {len(stale)} connection(s) from non-members but "
                          "they could not be checked: " + ret["comment"] + "".join(
                              f"; {labels[key]}: {why}" for key, why in errors.items()))
        return ret
    for key in {_four_tuple(sock) for sock in after} & set(labels):
        errors.setdefault(key, "still open after ss -K ({})".format(
            said.get(key) or "a kernel without CONFIG_INET_DIAG_DESTROY cannot close sockets"))
    closed = sorted(text for key, text in labels.items() if key not in errors)
    ret["changes"] = {"closed": closed} if closed else {}
    if errors:
        ret["result"] = False
        ret["comment"] = (f"Could not close {len(errors)} of {len(stale)} connection(s) from "
                          "non-members: " + "; ".join(
                              f"{labels[key]}: {why}" for key, why in sorted(
                                  errors.items(), key=lambda kv: labels[kv[0]])))
        return ret
    ret["comment"] = (f"Closed {len(closed)} connection(s) from non-members: "
                      + ", ".join(closed))
    return ret


# ---------------------------------------------------------------------------------------------
# members that left the pillar
def _members_gone(token, nodes, failed_only=False):
    """LAN members not in ``nodes`` that are still in the pool (serf status 1 alive,
    2 leaving, 4 failed; 3 is left); with ``failed_only``, only the failed ones (force-leave
    does nothing to a member that still gossips)."""
    members = _acl("api")("GET", "/v1/agent/members", token, timeout=10) or []
    keep = set(nodes)
    wanted = (4,) if failed_only else (1, 2, 4)
    return sorted(m["Name"] for m in members
                  if m.get("Name") not in keep and m.get("Status") in wanted)


def members_pruned(name, nodes, token_file=None):
    """
    Ensure the Consul agents of nodes no longer in the pillar are out of the cluster's LAN
    gossip pool (``consul force-leave``). A node dropped from the pillar without ``clean``
    is cut off by its peers' firewalls; it would stay a *failed* member for 72 h, and every
    cluster-wide query (the gossip keyring's) would fail on it. Consul forces out failed
    members only: one that still gossips (its peers have not applied yet) is named in the
    comment and left to :py:func:`gossip_keyring_managed`, which forces it out once it
    fails. Run it on the signer, which holds the management token (``operator =
    "write"``).

    :param str name: an identifier for the state
    :param list nodes: the Consul node names the pillar keeps
    :param str token_file: a file with a token allowed ``operator:write`` (the management
        token)
    :raises: nothing; a failed call is ``result: False``

    .. code-block:: yaml

        apigee-mtls-keyring-members-pruned:
          apigee_mtls.members_pruned:
            - nodes: [n1, n2, n3, n4]
            - token_file: /etc/consul.d/acl/management.token
    """
    ret = _ret(name)
    token = _acl("read_token")(token_file) if token_file else None
    api = _acl("api")
    try:
        gone = _members_gone(token, nodes, failed_only=True)
        alive = sorted(set(_members_gone(token, nodes)) - set(gone))
    except Exception as exc:  # pylint: disable=broad-except
        ret["result"] = None if __opts__["test"] else False
        ret["comment"] = f"Consul members not readable: {exc}"
        return ret
    if not gone:
        ret["comment"] = "Every Consul member is in the pillar" if not alive else (
            "Not in the pillar but still gossiping: {}; the peers' firewalls cut it off in "
            "this run, and it is forced out once failed".format(", ".join(alive)))
        return ret
    ret["changes"] = {"force_left": gone}
    if __opts__["test"]:
        ret["result"] = None
        ret["comment"] = "Would force-leave " + ", ".join(gone)
        return ret
    failed = []
    for member in gone:
        try:
            api("PUT", "/v1/agent/force-leave/" + member, token, timeout=10)
        except Exception as exc:  # pylint: disable=broad-except
            failed.append(f"{member} ({exc})")
    if failed:
        ret["result"] = False
        ret["comment"] = "force-leave failed: " + ", ".join(failed)
        return ret
    ret["comment"] = "Forced out of the cluster: " + ", ".join(gone)
    return ret


# ---------------------------------------------------------------------------------------------
# gossip keyring
def _fingerprint(key):
    """A printable identity for a gossip key that reveals nothing about it."""
    import hashlib  # pylint: disable=import-outside-toplevel

    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:12]


def gossip_keyring_managed(name, key=None, key_pillar=None, url="http://127.0.0.1:8500",
                           wait=120, token=None, token_file=None, nodes=None):
    """
    Ensure the cluster's gossip keyring holds exactly ``key``, as the primary key, on every
    node of every pool (LAN per data center, WAN). A new key is rotated in through
    ``/v1/operator/keyring`` the way ``consul keyring`` does: install it everywhere, make it
    primary, then remove the others, so that no node ever lacks a key its peers use. Keys
    are shown only as fingerprints. Run it on one server (the formula uses the signer). A
    rotation that fails midway reports the steps that were done in ``changes``.

    :param str name: an identifier for the state (not a path)
    :param str key: the gossip key (base64); prefer ``key_pillar``
    :param str key_pillar: pillar path of the key, read here: the key is then not part of the
        rendered SLS (``state.show_sls``) nor of the job's arguments; wins over ``key``
    :param str url: the local Consul agent's HTTP address (default
        ``http://127.0.0.1:8500``)
    :param int wait: seconds to retry the keyring queries (default 120)
    :param str token: Consul ACL token with ``keyring = "write"`` (default ``None``)
    :param str token_file: file holding that token, read here (wins over ``token``)
    :param list nodes: the pillar's nodes (Consul names) of this data center: while the
        keyring cannot be read because a member does not answer, failed members that are not
        among them (a node dropped from the pillar, cut off by its peers) are forced out
        (``changes.force_left``)
    :return: a state return

    .. code-block:: yaml

        apigee-mtls-keyring-managed:
          apigee_mtls.gossip_keyring_managed:
            - key_pillar: apigee_mtls:secrets:gossip_key
            - token_file: /etc/consul.d/acl/management.token
    """
    ret = _ret(name)
    if key_pillar:
        key = __salt__["pillar.get"](key_pillar, None, unmask=True)
    if not key:
        ret["result"] = False
        ret["comment"] = f"no gossip key ({key_pillar or 'key'} is empty)"
        return ret
    if token_file:
        token = _acl("read_token")(token_file)
    client = _client(ret, url)
    if client is None:
        return ret
    headers = client.prepare_headers(token)
    deadline = time.monotonic() + (0 if __opts__["test"] else wait)
    forced = []
    while True:
        try:
            pools = client.http.get(CB.json(), "/v1/operator/keyring", headers=headers) or []
            break
        except Exception as exc:  # pylint: disable=broad-except
            if __opts__["test"] or time.monotonic() > deadline:
                ret["result"] = None if __opts__["test"] else False
                ret["comment"] = f"Consul keyring not readable: {exc}"
                return ret
            if nodes is not None:
                try:
                    for member in _members_gone(token, nodes, failed_only=True):
                        _acl("api")("PUT", "/v1/agent/force-leave/" + member, token,
                                    timeout=10)
                        forced.append(member)
                except Exception:  # pylint: disable=broad-except
                    pass
            time.sleep(2)
    if forced:
        ret["changes"]["force_left"] = sorted(set(forced))
    present = set()
    complete = True
    for pool in pools:
        present |= set(pool.get("Keys") or {})
        if (pool.get("Keys") or {}).get(key) != pool.get("NumNodes"):
            complete = False
    others = sorted(present - {key})
    if complete and not others:
        ret["comment"] = f"Gossip keyring holds only {_fingerprint(key)}"
        return ret
    if not complete:
        ret["changes"]["installed"] = _fingerprint(key)
    if others:
        ret["changes"]["primary"] = _fingerprint(key)
        ret["changes"]["removed"] = [_fingerprint(k) for k in others]
    if __opts__["test"]:
        ret["result"] = None
        ret["comment"] = "Would rotate the gossip keyring to " + _fingerprint(key)
        return ret
    body = json.dumps({"Key": key})
    # (what the step does, the change it makes, the call)
    steps = []
    if not complete:
        steps.append(("install", {"installed": _fingerprint(key)}, lambda: client.http.post(
            CB.boolean(), "/v1/operator/keyring", data=body, headers=headers)))
    steps.append(("use", {"primary": _fingerprint(key)}, lambda: client.http.put(
        CB.boolean(), "/v1/operator/keyring", data=body, headers=headers)))
    for old in others:
        steps.append(("remove", {"removed": [_fingerprint(old)]},
                      lambda old=old: client.http.delete(
                          CB.boolean(), "/v1/operator/keyring", data=json.dumps({"Key": old}),
                          headers=headers)))
    # each step is a cluster-wide query that answers 500 when one member is slow to reply;
    # install, use and remove are idempotent: ask again until `wait` runs out
    deadline = time.monotonic() + wait
    done = {}
    for what, change, step in steps:
        while True:
            try:
                step()
                break
            except Exception as exc:  # pylint: disable=broad-except
                if time.monotonic() > deadline:
                    ret["result"] = False
                    ret["changes"] = done  # what the steps before this one did
                    # the exception text could echo the request body: keep it out
                    ret["comment"] = (f"keyring rotation failed at step '{what}' "
                                      f"({type(exc).__name__}); see the Consul log")
                    return ret
                time.sleep(2)
        for k, v in change.items():
            if isinstance(v, list):
                done.setdefault(k, []).extend(v)
            else:
                done[k] = v
    ret["comment"] = "Gossip keyring rotated to " + _fingerprint(key)
    return ret


def _keyring_file(path):
    """The keys of a serf keyring file (a JSON list of base64 keys, the primary first), or
    None when there is no file. Raises ValueError when it is not such a list (its content is
    never part of the error)."""
    text = _read(path)
    if text is None:
        return None
    try:
        keys = json.loads(text)
    except ValueError:
        keys = None
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"{path} is not a JSON list of keys")
    return keys


def _alive_peers(token):
    """Names of the LAN members the local agent sees alive (serf status 1), but itself.
    Raises when the agent does not answer, or when its answer does not list this node: a
    token without ``node:read`` gets a filtered list, which would look like a cut-off node."""
    members = _acl("api")("GET", "/v1/agent/members", token, timeout=5) or []
    status = {m.get("Name"): m.get("Status") for m in members if isinstance(m, dict)}
    me = __opts__["id"]
    if me not in status:
        raise CommandExecutionError(
            f"the agent's member list does not show {me} itself (an ACL token without "
            "node:read? pass the agent's local master token as token_file)")
    return sorted(n for n, st in status.items() if st == 1 and n != me)


def local_keyring_managed(name, key_pillar="apigee_mtls:secrets:gossip_key",
                          data_dir="/var/lib/consul", server=False, service="consul",
                          user="consul", group="consul", wait=20, token_file=None, peers=None):
    """
    Bring back a node that missed a gossip key rotation, by repairing its own keyring from the
    pillar. A node that was off while the signer rotated the key (``gossip_keyring_managed``)
    restarts with the old key as its primary (or only) key in ``<data_dir>/serf/local.keyring``
    (Consul ignores ``encrypt.json`` once that file exists): its peers no longer read it and
    no cluster-wide ``consul keyring`` reaches it. This state, run on every node before the
    signer's rotation, rewrites the file when the planner's ``local_keyring_action`` says so:
    the pillar key is not the primary key AND the local agent sees fewer than half of
    ``peers`` alive (``/v1/agent/members``, serf status 1) within ``wait`` seconds. The file
    then holds the pillar key first and the keys already there after it (it still decrypts
    peers that use them); ``serf/remote.keyring`` (the WAN pool) likewise on a server when it
    exists. The agent is stopped before the files are written (0600, ``user``:``group``,
    created with that mode) and started after. A node that still gossips with its peers is
    left to the signer's rotation; a node without a keyring file to the agent's first start.
    Keys are reported as fingerprints only, in ``changes``, comments and logs.

    :param str name: an identifier for the state (not a path)
    :param str key_pillar: pillar path of the gossip key, read here (default
        ``apigee_mtls:secrets:gossip_key``): the key is not part of the rendered SLS
    :param str data_dir: the agent's data directory (default ``/var/lib/consul``)
    :param bool server: the node is a Consul server, which also has a WAN keyring (default
        ``False``; with ``peers`` unset, the plan's word wins when it says server)
    :param str service: the agent's systemd unit (default ``consul``)
    :param str user: owner of the keyring files (default ``consul``)
    :param str group: group of the keyring files (default ``consul``)
    :param int wait: seconds to wait for peers to appear alive before the node is taken to be
        cut off, and after the restart for them to appear (default 20; none with ``test``)
    :param str token_file: a token file that may read every node (the agent's local master
        token: it works without the servers), with ACLs (default ``None``: no ACLs)
    :param list peers: the other members of the node's LAN pool (minion ids) (default
        ``None``: the plan's ``keyring.peers``)
    :raises: nothing; a keyring file that is not a JSON list of keys, an agent that does not
        answer (so whether the node is cut off cannot be told), a failed stop, write or start
        are ``result: False``
    :return: a state return

    .. code-block:: yaml

        apigee-mtls-keyring-local-managed:
          apigee_mtls.local_keyring_managed:
            - key_pillar: apigee_mtls:secrets:gossip_key
            - data_dir: /var/lib/consul
            - server: True
            - peers: [n1, n3, n4, n5]
            - token_file: /etc/consul.d/acl/agent-master.token
    """
    ret = _ret(name)
    key = __salt__["pillar.get"](key_pillar, None, unmask=True)
    if not key:
        ret["result"] = False
        ret["comment"] = f"no gossip key ({key_pillar} is empty)"
        return ret
    if peers is None:
        plan = _member_plan(ret)
        if plan is None:
            return ret
        if not plan.get("keyring"):
            ret["comment"] = "a retired node: no gossip keyring to keep"
            return ret
        peers = plan["keyring"]["peers"]
        server = server or plan["keyring"]["server"]
    lan = os.path.join(data_dir, "serf", "local.keyring")
    wan = os.path.join(data_dir, "serf", "remote.keyring")
    action = __utils__["apigee_mtls_plan.local_keyring_action"]
    try:
        local_keys = _keyring_file(lan)
        wan_keys = _keyring_file(wan) if server else None
    except ValueError as exc:
        ret["result"] = False
        ret["comment"] = (f"{exc}: the agent cannot start with it; remove it to have Consul "
                          "seed it from encrypt.json (the pillar key) at its next start")
        return ret
    decision = action(local_keys, key, None, peers)
    if decision["action"] == "none":
        ret["comment"] = f"{lan}: {decision['reason']}"
        return ret
    # the pillar key is not primary here: is this node cut off from its peers?
    token = _acl("read_token")(token_file) if token_file else None
    deadline = time.monotonic() + (0 if __opts__["test"] else wait)
    while True:
        error = None
        try:
            decision = action(local_keys, key, _alive_peers(token), peers)
        except Exception as exc:  # pylint: disable=broad-except
            error = str(exc)
        if (error is None and decision["action"] != "repair") or time.monotonic() >= deadline:
            break
        time.sleep(2)
    if error is not None:
        if __opts__["test"]:
            ret["comment"] = (f"Could not check whether this node is cut off from its gossip "
                              f"peers ({error}): the real run checks it")
        else:
            ret["result"] = False
            ret["comment"] = (f"{lan} lacks the pillar's gossip key as primary, and whether "
                              f"this node is cut off cannot be told: {error}")
        return ret
    if decision["action"] != "repair":
        ret["comment"] = f"{lan}: {decision['reason']}"
        return ret
    writes = [(lan, decision["keys"])]
    if wan_keys is not None:
        new_wan = __utils__["apigee_mtls_plan.keyring_with_primary"](wan_keys, key)
        if new_wan != wan_keys:
            writes.append((wan, new_wan))
    others = [k for k in decision["keys"] if k != key]
    ret["changes"] = {"primary": _fingerprint(key), "kept": [_fingerprint(k) for k in others],
                      "files": [path for path, _ in writes], "reason": decision["reason"],
                      "restart": service}
    if __opts__["test"]:
        ret["result"] = None
        ret["comment"] = (f"Would make {_fingerprint(key)} the primary key of "
                          f"{' and '.join(p for p, _ in writes)} and restart {service}: "
                          f"{decision['reason']}")
        return ret
    try:
        uid, gid = _ids(user, group)
    except CommandExecutionError as exc:
        ret["result"] = False
        ret["changes"] = {}
        ret["comment"] = f"keyring not repaired: {exc}"
        return ret
    log.warning("apigee_mtls: %s: this node is cut off from its gossip peers; making %s "
                "the primary key of %s and restarting %s", name, _fingerprint(key),
                ", ".join(p for p, _ in writes), service)
    # the files are written while the agent runs, then it restarts: a cut-off agent makes no
    # keyring change of its own to overwrite them, and Consul writes them only on keyring
    # operations, not at exit. (A stop, then a start, fails here: a cut-off Consul exits 1
    # on SIGTERM, and systemd's Restart=on-failure cancels the stop job.)
    written = []
    failed = None
    for path, keys in writes:
        try:
            _acl("write_secret")(path, json.dumps(keys), uid, gid, 0o600)
        except OSError as exc:
            failed = f"writing {path} failed ({exc.strerror or type(exc).__name__})"
            break
        written.append(path)
    started = __salt__["service.restart"](service)
    if failed or not started:
        ret["result"] = False
        if written:
            ret["changes"]["files"] = written
        else:
            ret["changes"] = {}
        problems = ([failed] if failed else []) + (
            [] if started else [f"starting {service} failed (see `journalctl -u {service}`)"])
        ret["comment"] = ("keyring repair incomplete: " + "; ".join(problems) + "; "
                          + (" and ".join(written) + " rewritten" if written
                             else "no file rewritten"))
        return ret
    # informational: the agent rejoins through retry_join within seconds
    seen = None
    deadline = time.monotonic() + wait
    while True:
        try:
            alive = set(_alive_peers(token)) & set(peers)
            seen = len(alive)
            if 2 * seen >= len(peers):
                break
        except Exception:  # pylint: disable=broad-except
            pass  # still starting
        if time.monotonic() >= deadline:
            break
        time.sleep(2)
    ret["comment"] = (f"Made {_fingerprint(key)} the primary key of "
                      f"{' and '.join(written)} and restarted {service}: {decision['reason']}; "
                      + (f"it now sees {seen} of its {len(peers)} peers alive"
                         if seen is not None and 2 * seen >= len(peers) else
                         f"after {wait} s it sees {seen or 'none'} of its {len(peers)} peers "
                         "alive: are they up? The signer's rotation (`salt <signer> "
                         "state.apply apigee_mtls`) installs the key on those that are"))
    return ret
