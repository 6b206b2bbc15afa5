"""What ``salt-call sys.doc apigee_mtls`` and ``sys.state_doc apigee_mtls`` print: every public
function of the execution module and every state documents each of its parameters by name
(``:param [type] name:``) and shows an example (``.. code-block::``, bash for the CLI, yaml
for an SLS); execution-module functions name the errors they raise."""

import inspect
import re

import pytest

from conftest import load_salt_module

MODULES = {"_modules": load_salt_module("_modules", "apigee_mtls_module_docs"),
           "_states": load_salt_module("_states", "apigee_mtls_states_docs")}
#: execution-module functions that raise nothing: no input, or the peer protocol's dicts
RAISE_NOTHING = {"gossip_keygen", "ipv6_skip_reason", "issue_acl_token", "answer_request",
                 "accept_answer"}


def _public(module):
    """``{name: function}`` of what Salt's loader exposes: functions defined in the module
    (not imported), not starting with ``_`` (``__virtual__`` included)."""
    return {name: obj for name, obj in vars(module).items()
            if callable(obj) and inspect.isfunction(obj)
            and obj.__module__ == module.__name__ and not name.startswith("_")}


FUNCTIONS = [(kind, name) for kind, module in MODULES.items() for name in _public(module)]


def test_the_walk_finds_both_modules_functions():
    names = {kind: {n for k, n in FUNCTIONS if k == kind} for kind in MODULES}
    assert {"validate", "plan", "verify", "report", "sign_agent_certificate"} <= names["_modules"]
    assert {"agent_certificate_managed", "firewall_managed", "intentions_managed",
            "gossip_keyring_managed", "connect_leaf_ready"} <= names["_states"]


@pytest.mark.parametrize("kind,name", FUNCTIONS, ids=[f"{k[1:]}.{n}" for k, n in FUNCTIONS])
def test_docstring_documents_every_parameter_and_shows_an_example(kind, name):
    fun = getattr(MODULES[kind], name)
    doc = inspect.getdoc(fun)
    assert doc, f"{name} has no docstring"
    for param in inspect.signature(fun).parameters.values():
        assert re.search(rf":param (?:[\w.]+ )?{param.name}:", doc), (
            f"{name}: parameter {param.name!r} is not documented (:param [type] name:)")
    lang = "bash" if kind == "_modules" else "yaml"
    assert f".. code-block:: {lang}" in doc, f"{name}: no {lang} example"
    if kind == "_modules":
        assert f"apigee_mtls.{name}" in doc.split(".. code-block::", 1)[1], name
        if name not in RAISE_NOTHING:
            assert ":raises CommandExecutionError:" in doc, f"{name}: errors not documented"
    else:
        assert f"apigee_mtls.{name}:" in doc.split(".. code-block::", 1)[1], name


def test_module_headers_list_every_function():
    for kind, module in MODULES.items():
        for name in _public(module):
            if name != "report":  # an alias of ports, named with it
                assert f":py:func:`{name}`" in module.__doc__, (kind, name)
