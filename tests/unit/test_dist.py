"""Issue 13: the formula in Salt's own layout (tools/dist.py), for one file root: the SPM
package installs every SLS file, the custom modules, pillar.example and the README, and
nothing from tests/, lab/, bench/ or tools/; the `salt-formula` branch (one gitfs remote) holds
the same files as the staged directory the lab's master serves."""
import os
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))
import dist  # noqa: E402  pylint: disable=wrong-import-position

NOT_SHIPPED = ("tests/", "lab/", "bench/", "tools/", ".ci/", "docs/", "formula/")


def _sls_files():
    base = os.path.join(REPO, "formula", "apigee_mtls")
    return sorted(os.path.relpath(os.path.join(root, n), base)
                  for root, _, names in os.walk(base) for n in names if n.endswith(".sls"))


def _tree(root):
    return sorted(os.path.relpath(os.path.join(r, n), root)
                  for r, _, names in os.walk(root) for n in names)


def test_layout_puts_the_sls_tree_next_to_the_custom_modules():
    files = dist.files()
    sls = _sls_files()
    assert len(sls) >= 20
    assert all(f"apigee_mtls/{s}" in files for s in sls)
    for mod in ("_modules/apigee_mtls.py", "_states/apigee_mtls.py",
                "_utils/apigee_mtls_plan.py", "apigee_mtls/map.jinja",
                "apigee_mtls/files/consul.service.jinja", "pillar.example", "README.md",
                "LICENSE", "FORMULA"):
        assert mod in files, mod
    assert not [f for f in files if f.startswith(NOT_SHIPPED) or "__pycache__" in f
                or f.endswith(".pyc")]


def test_stage_is_exact_and_idempotent(tmp_path):
    out = tmp_path / "root"
    assert len(dist.stage(str(out))) == len(dist.files())
    (out / "apigee_mtls" / "stale.sls").write_text("x: {}\n")
    assert dist.stage(str(out)) == ["apigee_mtls/stale.sls"]
    assert dist.stage(str(out)) == []
    assert _tree(str(out)) == sorted(dist.files())
    script = "apigee_mtls/files/apigee-mtls-firewall.sh"
    assert os.stat(out / script).st_mode & 0o777 == os.stat(dist.files()[script]).st_mode & 0o777


def test_spm_package_installs_every_sls_file_the_modules_and_docs_into_a_scratch_root(tmp_path):
    pkg = dist.spm(str(tmp_path / "build"))
    with tarfile.open(pkg) as tar:
        members = [m.name for m in tar.getmembers() if m.isfile()]
    assert not [m for m in members if m.split("/", 1)[-1].startswith(NOT_SHIPPED)], members
    root = tmp_path / "root"
    conf = dist.spm_config(str(root))
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "spm"), "-c", conf, "-y",
                    "local", "install", pkg], check=True, capture_output=True, text=True)
    salt_root = root / "srv" / "spm" / "salt"
    installed = _tree(str(salt_root))
    expected = sorted(
        [f"apigee_mtls/{f}" for f in _tree(os.path.join(REPO, "formula", "apigee_mtls"))
         if "__pycache__" not in f]
        + [f for f in dist.files() if f.startswith(("_modules/", "_states/", "_utils/"))]
        + ["apigee_mtls/README.md"])
    assert installed == expected
    assert all(f"apigee_mtls/{s}" in installed for s in _sls_files())
    assert _tree(str(root / "srv" / "spm" / "pillar")) == ["apigee_mtls.sls.orig"]
    with open(root / "srv" / "spm" / "pillar" / "apigee_mtls.sls.orig", encoding="utf-8") as fh:
        assert fh.read() == open(os.path.join(REPO, "pillar.example"), encoding="utf-8").read()


@pytest.mark.skipif(not os.path.isdir(os.path.join(REPO, ".git")), reason="not a git clone")
def test_branch_holds_the_staged_layout_and_commits_only_on_change(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", REPO, str(clone)], check=True)
    first = dist.branch("salt-formula", repo=str(clone))
    listed = subprocess.run(["git", "-C", str(clone), "ls-tree", "-r", "--name-only", first],
                            check=True, capture_output=True, text=True).stdout.split()
    assert sorted(listed) == sorted(dist.files(str(clone)))
    assert dist.branch("salt-formula", repo=str(clone)) == first
    status = subprocess.run(["git", "-C", str(clone), "status", "--porcelain"], check=True,
                            capture_output=True, text=True).stdout
    assert status == ""
    (clone / "formula" / "apigee_mtls" / "init.sls").write_text("# changed\n")
    second = dist.branch("salt-formula", repo=str(clone))
    assert second != first
    parent = subprocess.run(["git", "-C", str(clone), "rev-parse", f"{second}^"], check=True,
                            capture_output=True, text=True).stdout.strip()
    assert parent == first
    shown = subprocess.run(["git", "-C", str(clone), "show", f"{second}:apigee_mtls/init.sls"],
                           check=True, capture_output=True, text=True).stdout
    assert shown == "# changed\n"
