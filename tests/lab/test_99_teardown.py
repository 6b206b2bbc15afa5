"""`make lab-down` (labctl down) leaves the host as it was before the lab: no machines,
bridge, veths, mounts, iptables rules or processes. Runs last."""
import os
import subprocess
import sys

from conftest import REPO, REUSE, host_fingerprint

import pytest


@pytest.mark.skipif(REUSE, reason="LAB_REUSE=1 keeps the developer's lab")
def test_lab_down_leaves_the_host_as_it_was(lab, host_baseline):
    subprocess.run([sys.executable, os.path.join(REPO, "lab", "labctl.py"), "down"], check=True,
                   capture_output=True)
    after = host_fingerprint()
    assert after["procs"] == host_baseline["procs"]
    assert after["links"] == host_baseline["links"]
    assert after["mounts"] == host_baseline["mounts"]
    assert after["iptables"] == host_baseline["iptables"]
    # a second down is harmless (recovers from anything half-done, here nothing)
    subprocess.run([sys.executable, os.path.join(REPO, "lab", "labctl.py"), "down"], check=True,
                   capture_output=True)
    assert host_fingerprint() == after
