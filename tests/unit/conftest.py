"""
Shared fixtures for the planner unit tests.

The planner lives in ``_utils/`` (a Salt custom util, not a package): it is
loaded here by path and registered as ``apigee_mtls_plan`` in ``sys.modules``,
so test modules can simply ``import apigee_mtls_plan``.
"""

import copy
import importlib.util
import pathlib
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODULE_PATH = ROOT / "_utils" / "apigee_mtls_plan.py"
TOPOLOGIES = ROOT / "tests" / "topologies"
BAD_PILLARS = pathlib.Path(__file__).resolve().parent / "bad_pillars"
TOPOLOGY_NAMES = ("5-node", "9-node", "13-node", "12-node-2dc")


def _load_planner():
    spec = importlib.util.spec_from_file_location("apigee_mtls_plan", MODULE_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["apigee_mtls_plan"] = module
    spec.loader.exec_module(module)
    return module


PLANNER = _load_planner()


def load_salt_module(kind, name, file_name="apigee_mtls.py"):
    """Import ``<kind>/<file_name>`` (``_modules`` or ``_states``) as a plain module named
    ``name``, outside Salt's loader: tests set its ``__salt__``, ``__opts__``, ...
    themselves."""
    spec = importlib.util.spec_from_file_location(name, ROOT / kind / file_name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def salt_file_functions(chowned):
    """Salt's own ``file.write``, ``file.set_mode`` and ``file.rename`` (they need no loader),
    and a ``file.chown`` that records ``(path, user, group)`` in ``chowned`` (tests do not
    run as the users they name)."""
    import salt.modules.file as salt_file  # pylint: disable=import-outside-toplevel

    return {"file.write": salt_file.write, "file.set_mode": salt_file.set_mode,
            "file.rename": salt_file.rename,
            "file.chown": lambda path, user, group: chowned.append((path, user, group))}


_CACHE = {}


def load_topology(name):
    """Return a fresh copy of ``tests/topologies/<name>.yaml``."""
    if name not in _CACHE:
        with open(TOPOLOGIES / (name + ".yaml"), encoding="utf-8") as handle:
            _CACHE[name] = yaml.safe_load(handle)
    return copy.deepcopy(_CACHE[name])


@pytest.fixture
def amp():
    """The planner module."""
    return PLANNER


@pytest.fixture
def topo5():
    return load_topology("5-node")


@pytest.fixture
def topo9():
    return load_topology("9-node")


@pytest.fixture
def topo13():
    return load_topology("13-node")


@pytest.fixture
def topo12():
    return load_topology("12-node-2dc")


@pytest.fixture(params=TOPOLOGY_NAMES)
def any_topology(request):
    return load_topology(request.param)
