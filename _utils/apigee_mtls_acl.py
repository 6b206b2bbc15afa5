# -*- coding: utf-8 -*-
"""
Consul ACL helpers for the ``apigee_mtls`` formula: a minimal client for the local agent's
HTTP API (tokens travel in the ``X-Consul-Token`` header, never in a URL, an argument or an
error), and the sealing of tokens for one node.

Sealing: the signer answers a node's token request through the master's reactor (an
``apigee_mtls/answer`` event, then a job of ``apigee_mtls.accept_answer`` on the node), and
the master's event bus and job cache carry the answer. The token is therefore encrypted to the
requesting node's agent public key (the EC key whose certificate the signer signs; its
private half never leaves the node): ECIES with an ephemeral key on the same curve, ECDH,
HKDF-SHA256 and AES-256-GCM. Only that node can open it.

Loaded by Salt as ``__utils__["apigee_mtls_acl.<function>"]`` and imported directly by the
unit tests.

:depends: cryptography
"""

import base64
import json
import os
import urllib.error
import urllib.request

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_INFO = b"apigee_mtls sealed consul token v1"


class ConsulError(Exception):
    """An HTTP API call failed: ``status`` (None when the agent did not answer) and a reason
    from Consul. Never holds the token."""

    def __init__(self, status, reason):
        super().__init__("HTTP {}: {}".format(status, reason) if status else reason)
        self.status = status
        self.reason = reason


def read_token(path):
    """The token in ``path`` (stripped), or None when the file is missing or empty."""
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except OSError:
        return None
    return token or None


def write_secret(path, text, uid, gid, mode=0o600):
    """Write ``text`` to ``path`` atomically; the file is created with ``mode`` before any
    byte is written, then given to ``uid``/``gid``."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, text.encode("utf-8"))
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def api(method, path, token=None, body=None, port=8500, timeout=10):
    """
    Call the local agent's HTTP API (127.0.0.1:port).

    :return: the decoded JSON answer (or the text, or None when empty)
    :raises ConsulError: on an HTTP error or when the agent does not answer
    """
    data = None
    if body is not None:
        data = body.encode("utf-8") if isinstance(body, str) else json.dumps(body).encode()
    req = urllib.request.Request("http://127.0.0.1:{}{}".format(port, path), data=data,
                                 method=method)
    if token:
        req.add_header("X-Consul-Token", token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            text = res.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        reason = exc.read().decode("utf-8", "replace").strip()[:300]
        if token:
            reason = reason.replace(token, "<token>")
        raise ConsulError(exc.code, reason) from None
    except (OSError, ValueError) as exc:
        raise ConsulError(None, "local Consul agent not answering: {}".format(
            type(exc).__name__ if not str(exc) else exc)) from None
    text = text.strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def seal(public_key_pem, plaintext):
    """
    Encrypt ``plaintext`` (str) so that only the holder of the private key of
    ``public_key_pem`` (an EC public key) can read it.

    :return: a JSON-safe dict ``{"v", "epk", "nonce", "ct"}`` (base64)
    """
    peer = serialization.load_pem_public_key(
        public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem)
    if not isinstance(peer, ec.EllipticCurvePublicKey):
        raise ValueError("sealing needs an EC public key (the agent key is EC)")
    eph = ec.generate_private_key(peer.curve)
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=_INFO).derive(eph.exchange(ec.ECDH(), peer))
    nonce = os.urandom(12)
    epk = eph.public_key().public_bytes(serialization.Encoding.X962,
                                        serialization.PublicFormat.UncompressedPoint)
    ct = AESGCM(key).encrypt(nonce, plaintext.encode("utf-8"), epk)
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    return {"v": 1, "epk": b64(epk), "nonce": b64(nonce), "ct": b64(ct)}


def unseal(private_key_pem, sealed):
    """
    Open a :func:`seal` box with the EC private key (PEM).

    :raises ValueError: on a malformed box, another key, or tampering
    """
    if not isinstance(sealed, dict) or sealed.get("v") != 1:
        raise ValueError("not a sealed token")
    priv = serialization.load_pem_private_key(
        private_key_pem.encode() if isinstance(private_key_pem, str) else private_key_pem,
        password=None)
    try:
        epk = base64.b64decode(sealed["epk"])
        nonce = base64.b64decode(sealed["nonce"])
        ct = base64.b64decode(sealed["ct"])
        peer = ec.EllipticCurvePublicKey.from_encoded_point(priv.curve, epk)
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=_INFO).derive(priv.exchange(ec.ECDH(), peer))
        return AESGCM(key).decrypt(nonce, ct, epk).decode("utf-8")
    except Exception as exc:  # pylint: disable=broad-except
        raise ValueError("cannot open the sealed token ({})".format(type(exc).__name__)) \
            from None
