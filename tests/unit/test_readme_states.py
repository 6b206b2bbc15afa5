"""README "Available states" documents every SLS of the formula, and only those (issue 13).

Every ``.sls`` file under ``formula/apigee_mtls/`` is an SLS a user can apply (``init.sls`` is
its directory's name: ``config/init.sls`` is ``apigee_mtls.config``); each must have an entry
in the section, a list item that starts with its name as a code span (`` - `apigee_mtls.x`: ``).
An SLS added without an entry, or an entry (or any ``apigee_mtls.<x>`` code span) left behind
after an SLS is renamed or removed, fails here. Each entry also names, as code spans, the
custom states its SLS uses and the SLS it includes, so the entry follows its file."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FORMULA = ROOT / "formula"
README = ROOT / "README.md"
HEADING = "### Available states"

#: a list item opening an entry: `` - `apigee_mtls.x`: ``
ENTRY = re.compile(r"^- `([^`]+)`:")
#: a code span naming something in the apigee_mtls namespace (an SLS, state or function)
NAME = re.compile(r"apigee_mtls(?:\.\w+)*")
#: a custom state in an SLS: ``  apigee_mtls.<state>:`` under a state ID
CUSTOM_STATE = re.compile(r"^\s+apigee_mtls\.(\w+):\s*$", re.M)


def sls_name(path):
    """``formula/apigee_mtls/config/init.sls`` -> ``apigee_mtls.config``,
    ``formula/apigee_mtls/tls/ca.sls`` -> ``apigee_mtls.tls.ca``."""
    parts = path.relative_to(FORMULA).with_suffix("").parts
    if parts[-1] == "init":
        parts = parts[:-1]
    return ".".join(parts)


SLS_FILES = sorted((FORMULA / "apigee_mtls").rglob("*.sls"))
SLS = {sls_name(path): path for path in SLS_FILES}


def _public_functions(kind):
    """Names of the public top-level functions of ``<kind>/apigee_mtls.py``: what Salt's loader
    exposes as ``apigee_mtls.<name>`` (read with ast: no Salt needed)."""
    tree = ast.parse((ROOT / kind / "apigee_mtls.py").read_text())
    return {node.name for node in tree.body
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")}


CUSTOM_STATES = _public_functions("_states")
FUNCTIONS = CUSTOM_STATES | _public_functions("_modules")


def _section():
    """The lines of the README's "Available states" section: from its heading to the next
    heading of level 1 to 3 (outside fenced code blocks)."""
    lines = README.read_text().splitlines()
    assert lines.count(HEADING) == 1, f"README needs exactly one {HEADING!r} heading"
    start = lines.index(HEADING) + 1
    fenced = False
    for end in range(start, len(lines)):
        if lines[end].lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,3} ", lines[end]):
            return lines[start:end]
    return lines[start:]


def _entries(section):
    """``{sls name: entry text}``; the entry is its list item with its indented continuation
    lines. Duplicate entries fail."""
    entries = {}
    current = None
    for line in section:
        match = ENTRY.match(line)
        if match:
            current = match.group(1)
            assert current not in entries, f"{current} has two entries"
            entries[current] = line
        elif current and line.startswith("  ") and line.strip():
            entries[current] += "\n" + line
        else:
            current = None
    return entries


SECTION = _section()
ENTRIES = _entries(SECTION)


def _spans(text):
    return set(re.findall(r"`([^`\n]+)`", text))


def _includes(path):
    """The SLS names of a file's ``include:`` list (Jinja conditions inside it are skipped:
    whatever it may include, its entry names)."""
    names = []
    lines = path.read_text().splitlines()
    for index, line in enumerate(lines):
        if line.strip() == "include:":
            for item in lines[index + 1:]:
                match = re.match(r"^\s+- (apigee_mtls[\w.]*)\s*$", item)
                if match:
                    names.append(match.group(1))
                elif not item.lstrip().startswith("{%"):
                    break
    return names


def test_the_walk_finds_every_sls():
    assert len(SLS) == len(SLS_FILES), "two files map to the same SLS name"
    assert {"apigee_mtls", "apigee_mtls.clean", "apigee_mtls.config", "apigee_mtls.config.clean",
            "apigee_mtls.tls.ca", "apigee_mtls.orch.rollout"} <= set(SLS)
    assert SLS["apigee_mtls.tls.ca"] == FORMULA / "apigee_mtls" / "tls" / "ca.sls"


def test_the_section_is_parsed():
    assert ENTRIES, "no entries (`` - `apigee_mtls.x`: ...``) in the section"
    assert {"agent_certificate_managed", "firewall_managed"} <= CUSTOM_STATES
    assert {"verify", "rollout_stage"} <= FUNCTIONS
    assert _includes(SLS["apigee_mtls.firewall"]) == ["apigee_mtls.mesh",
                                                      "apigee_mtls.intentions"]


def test_the_section_names_the_entry_point():
    assert "`salt '*' state.apply apigee_mtls`" in "\n".join(SECTION)


@pytest.mark.parametrize("name", sorted(SLS))
def test_every_sls_has_an_entry(name):
    assert name in ENTRIES, (
        f"{SLS[name].relative_to(ROOT)} is not documented: add `` - `{name}`: `` to the "
        f"README's {HEADING!r}")


def test_every_entry_is_an_sls():
    stale = sorted(set(ENTRIES) - set(SLS))
    assert not stale, f"entries for SLS that do not exist: {stale}"


def test_the_section_names_no_sls_that_does_not_exist():
    """Any code span naming ``apigee_mtls[.<x>...]`` is an SLS, a custom state or an
    execution-module function."""
    unknown = sorted(span for span in _spans("\n".join(SECTION))
                     if NAME.fullmatch(span) and span not in SLS
                     and span.split(".", 1)[-1] not in FUNCTIONS)
    assert not unknown, f"neither an SLS nor a custom state or function: {unknown}"


@pytest.mark.parametrize("name", sorted(SLS))
def test_entry_names_the_custom_states_its_sls_uses(name):
    used = {f"apigee_mtls.{state}" for state in CUSTOM_STATE.findall(SLS[name].read_text())}
    assert used <= {f"apigee_mtls.{state}" for state in CUSTOM_STATES}, used
    missing = sorted(used - _spans(ENTRIES.get(name, "")))
    assert not missing, f"the entry of {name} does not name the custom states {missing}"


@pytest.mark.parametrize("name", sorted(SLS))
def test_entry_names_what_its_sls_includes(name):
    missing = sorted(set(_includes(SLS[name])) - _spans(ENTRIES.get(name, "")))
    assert not missing, f"the entry of {name} does not name what it includes: {missing}"
