"""The README's GPG example, done for real (masterless, nothing applied): the gossip key is
encrypted with a throwaway key, the pillar file uses Salt's ``yaml|gpg`` renderer, and the
formula's own validation and plan see the decrypted key; the ciphertext never reaches them."""
import os
import subprocess

import pytest
import yaml

from conftest import load_topology
from test_render_os_families import (  # the masterless harness of the render tests
    OSES, TOPOLOGY, _salt_call, _write_minion_config, _write_tree)


def _gpg(home, *args, data=None):
    proc = subprocess.run(["gpg", "--homedir", str(home), "--batch", "--yes", *args],
                          input=data, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def gpg_home(tmp_path):
    home = tmp_path / "gpgkeys"
    home.mkdir(mode=0o700)
    yield home
    # gpg starts an agent for the home directory: end it with the test
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False,
                   capture_output=True, timeout=30)


def test_gpg_encrypted_gossip_key_is_decrypted_for_the_formula(tmp_path, gpg_home):
    home = gpg_home
    _gpg(home, "--passphrase", "", "--quick-gen-key", "salt-master", "default", "default",
         "never")
    key = load_topology(TOPOLOGY)["secrets"]["gossip_key"]
    armored = _gpg(home, "--armor", "--trust-model", "always", "--encrypt", "-r",
                   "salt-master", data=key)
    assert armored.startswith("-----BEGIN PGP MESSAGE-----") and key not in armored
    extmods_root, pillar_root = _write_tree(tmp_path)
    pillar = load_topology(TOPOLOGY)
    pillar["secrets"]["gossip_key"] = armored
    (pillar_root / "apigee_mtls.sls").write_text(
        "#!yaml|gpg\n" + yaml.safe_dump({"apigee_mtls": pillar}, default_style=None))
    config = _write_minion_config(tmp_path, "debian12", OSES["debian12"], extmods_root,
                                  pillar_root)
    with open(config / "minion", "a", encoding="utf-8") as fh:
        fh.write(f"gpg_keydir: {home}\n")
    assert _salt_call(config, "saltutil.sync_all")["rc"] == 0
    res = _salt_call(config, "apigee_mtls.validate")
    assert res["rc"] == 0 and "error" not in res["out"] and res["out"]["servers"], res
    plan = _salt_call(config, "apigee_mtls.plan", "secrets=True")
    assert plan["out"]["encrypt_config"]["encrypt"] == key, plan["stdout"][-500:]
    hidden = _salt_call(config, "apigee_mtls.plan")
    assert hidden["out"]["encrypt_config"]["encrypt"] == "<hidden>"
    assert os.stat(home).st_mode & 0o077 == 0
