#!/usr/bin/env python3
"""
The formula in Salt's own layout, for one file root: ``apigee_mtls/`` (the SLS tree, from
``formula/apigee_mtls``) next to ``_modules/``, ``_states/`` and ``_utils/``, with ``FORMULA``,
``pillar.example``, ``README.md``, ``LICENSE`` and ``CHANGELOG.md``. The repository keeps its own
layout (``formula/``, ``_modules/``, ... at the top); this tool derives the one Salt serves:

- ``stage DIR``: the layout as a directory (the lab's master serves it as its one file root);
- ``branch [NAME]``: the layout as a git branch (default ``salt-formula``), one commit per
  change, made with git plumbing (no checkout, the work tree is untouched): what one
  ``gitfs_remotes`` entry (``base: salt-formula``) or one clone in ``file_roots`` serves;
- ``spm DIR``: the SPM package, ``DIR/apigee_mtls-<version>-<release>.spm``, built from the
  staged layout (SPM installs the SLS files only from a top-level directory named after
  ``top_level_dir``).

Nothing from ``tests/``, ``lab/``, ``bench/`` or ``tools/`` is in any of them.

CLI::

    python3 tools/dist.py stage /tmp/apigee_mtls
    python3 tools/dist.py branch
    python3 tools/dist.py spm dist/
"""
import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "apigee_mtls"
#: (path in the repository, path in Salt's layout)
LAYOUT = (
    ("formula/apigee_mtls", "apigee_mtls"),
    ("_modules", "_modules"),
    ("_states", "_states"),
    ("_utils", "_utils"),
    ("FORMULA", "FORMULA"),
    ("pillar.example", "pillar.example"),
    ("README.md", "README.md"),
    ("LICENSE", "LICENSE"),
    ("CHANGELOG.md", "CHANGELOG.md"),
)
SKIP_DIRS = {"__pycache__"}
SKIP_SUFFIXES = (".pyc", ".pyo", "~", ".swp")


def files(repo=REPO):
    """
    The formula's files in Salt's layout.

    :param str repo: the repository's root
    :return: ``{path in Salt's layout: absolute source path}`` (dict), sorted by path
    """
    out = {}
    for src, dst in LAYOUT:
        path = os.path.join(repo, src)
        if os.path.isfile(path):
            out[dst] = path
            continue
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
            for name in names:
                if name.endswith(SKIP_SUFFIXES):
                    continue
                full = os.path.join(root, name)
                out[os.path.join(dst, os.path.relpath(full, path))] = full
    return dict(sorted(out.items()))


def stage(out_dir, repo=REPO):
    """
    Make ``out_dir`` hold exactly the formula in Salt's layout: new and changed files are
    copied (mode kept), files no longer in it removed.

    :param str out_dir: the directory (created when missing)
    :param str repo: the repository's root
    :return: the paths that changed (list of str)
    """
    wanted = files(repo)
    changed = []
    for rel, src in wanted.items():
        dst = os.path.join(out_dir, rel)
        if os.path.isfile(dst) and filecmp.cmp(src, dst, shallow=False):
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst + ".new")
        os.replace(dst + ".new", dst)
        changed.append(rel)
    for root, dirs, names in os.walk(out_dir, topdown=False):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), out_dir)
            if rel not in wanted:
                os.remove(os.path.join(root, name))
                changed.append(rel)
        for name in dirs:
            full = os.path.join(root, name)
            if not os.listdir(full):
                os.rmdir(full)
    return changed


def _git(repo, *args, env=None, data=None):
    return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True,
                          text=True, input=data, env=env).stdout.strip()


def branch(name="salt-formula", repo=REPO):
    """
    Commit the formula in Salt's layout to branch ``name`` (created when missing; a new commit
    only when the tree differs), without touching the work tree or the index.

    :param str name: the branch
    :param str repo: the repository's root (a git work tree)
    :return: the branch's commit (str, 40 hex digits)
    """
    head = _git(repo, "rev-parse", "--short", "HEAD")
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, GIT_INDEX_FILE=os.path.join(tmp, "index"))
        lines = []
        for rel, src in files(repo).items():
            blob = _git(repo, "hash-object", "-w", src)
            mode = "100755" if os.access(src, os.X_OK) else "100644"
            lines.append(f"{mode} {blob}\t{rel}")
        _git(repo, "update-index", "--add", "--index-info", env=env, data="\n".join(lines) + "\n")
        tree = _git(repo, "write-tree", env=env)
    try:
        tip = _git(repo, "rev-parse", "--verify", "-q", f"refs/heads/{name}")
    except subprocess.CalledProcessError:
        tip = ""
    if tip and _git(repo, "rev-parse", f"{tip}^{{tree}}") == tree:
        return tip
    parents = ["-p", tip] if tip else []
    commit = _git(repo, "commit-tree", tree, *parents,
                  "-m", f"{NAME} in Salt's layout, from {head} (tools/dist.py)")
    _git(repo, "update-ref", f"refs/heads/{name}", commit)
    return commit


_SPM_FILES = {"spm_db", "spm_logfile", "spm_repos_config"}


def spm_config(root, build_dir=None):
    """
    An SPM configuration confined to ``root``: its database, cache, log and the roots it
    installs formulas, pillars and reactors into (``root/srv/spm/salt``, ...).

    :param str root: the scratch root (created when missing)
    :param str build_dir: where ``spm build`` writes packages (default ``root/build``)
    :return: the configuration directory, for ``spm -c`` (str)
    """
    conf = os.path.join(root, "etc")
    os.makedirs(conf, exist_ok=True)
    paths = {"formula_path": "srv/spm/salt", "pillar_path": "srv/spm/pillar",
             "reactor_path": "srv/spm/reactor", "spm_cache_dir": "cache",
             "spm_db": "cache/packages.db", "spm_logfile": "spm.log",
             "spm_share_dir": "share", "spm_repos_config": "etc/spm.repos",
             "spm_build_dir": "build"}
    with open(os.path.join(conf, "spm"), "w", encoding="utf-8") as fh:
        for key, rel in paths.items():
            path = os.path.join(root, rel)
            if key == "spm_build_dir" and build_dir:
                path = build_dir
            os.makedirs(os.path.dirname(path) if key in _SPM_FILES else path, exist_ok=True)
            fh.write(f"{key}: {path}\n")
    return conf


def spm(out_dir, repo=REPO, spm_bin=None):
    """
    Build the SPM package from the staged layout.

    :param str out_dir: where the ``.spm`` file goes (created when missing)
    :param str repo: the repository's root
    :param str spm_bin: the ``spm`` command (default: next to this Python, else on PATH)
    :return: the package's path (str)
    :raises subprocess.CalledProcessError: when ``spm build`` fails
    """
    spm_bin = spm_bin or shutil.which("spm", path=os.path.dirname(sys.executable)) or "spm"
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tree = os.path.join(tmp, NAME)
        stage(tree, repo)
        conf = spm_config(os.path.join(tmp, "spm"), build_dir=os.path.abspath(out_dir))
        subprocess.run([spm_bin, "-c", conf, "-y", "build", tree], check=True,
                       capture_output=True, text=True)
    meta = {}
    with open(os.path.join(repo, "FORMULA"), encoding="utf-8") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            meta[key.strip()] = value.strip()
    return os.path.join(out_dir, f"{NAME}-{meta['version']}-{meta['release']}.spm")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("stage").add_argument("dir")
    sub.add_parser("branch").add_argument("name", nargs="?", default="salt-formula")
    sub.add_parser("spm").add_argument("dir")
    args = parser.parse_args(argv)
    if args.cmd == "stage":
        print(f"{len(stage(args.dir))} files changed in {args.dir}")
    elif args.cmd == "branch":
        print(f"{args.name}: {branch(args.name)}")
    else:
        print(spm(args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
