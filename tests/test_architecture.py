"""The floors of docs/architecture.md, checked on the AST of every module (function bodies included; imports under
`if TYPE_CHECKING:` never run and are left out): the doc's table is the rule, so the doc and the code cannot drift.

- no import cycle among the project's modules;
- each floor imports only the floors its row allows, and never the third-party packages its row forbids
  (so mlflow only in registry/, prefect never in cpmant/);
- no MLflow tag name (a "cpmant.x" string) outside registry/tags.py, no "mlflow.x" run tag outside registry/;
- no MLflow length cut (a slice by a constant of 480 or more) outside registry/limits.py;
- identity hashes only through cpmant/hashing.py: hashlib elsewhere only for blake2b (split keys, dedupe
  fingerprints, seeds, which are no identities).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
FLOORS = ("cpmant", "registry", "tasks", "flows", "cpmant_cli")


def floor_rules(doc: Path = DOC) -> dict[str, tuple[set[str], set[str]]]:
    """floor -> (the project floors it may import, the third-party packages it never imports), from the doc's
    table."""
    rules = {}
    for line in doc.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and (m := re.fullmatch(r"`(\w+)`", cells[0])):
            rules[m.group(1)] = (set(re.findall(r"`(\w+)`", cells[2])), set(re.findall(r"`(\w+)`", cells[3])))
    return rules


def module_files() -> dict[str, Path]:
    out = {}
    for floor in FLOORS:
        for p in (ROOT / floor).rglob("*.py"):
            if "__pycache__" in p.parts:
                continue
            parts = p.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            for other in node.orelse:
                yield other
                yield from _runtime_nodes(other)
            continue
        yield node
        yield from _runtime_nodes(node)


def imports_of(mod: str, path: Path) -> set[str]:
    """The absolute names `mod` imports (a `from X import y` gives X.y, which may name a module or a name in X)."""
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    names: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # `from X import a`: the module X.a when a is a submodule, else X (import_graph strips the name);
            # a package's __init__ runs before any of its submodules anyway, so that edge is no cycle
            names |= {f"{base}.{a.name}" if a.name != "*" else base for a in node.names}
    return names


def import_graph(files: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    files = files or module_files()
    graph = {}
    for mod, path in files.items():
        deps = set()
        for name in imports_of(mod, path):
            while name and name not in files:  # `from a.b import c` where c is a name: the module a.b
                name = name.rpartition(".")[0]
            if name and name != mod:
                deps.add(name)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def floor_violations(files: dict[str, Path], rules: dict[str, tuple[set[str], set[str]]]) -> list[str]:
    out = []
    for mod, path in sorted(files.items()):
        floor = mod.split(".")[0]
        allowed, never = rules[floor]
        for name in sorted({n if n.split(".")[0] in FLOORS else n.split(".")[0] for n in imports_of(mod, path)}):
            root = name.split(".")[0]
            if root in FLOORS and root not in allowed:
                out.append(f"{mod} imports {name}: the {floor} floor may import only {sorted(allowed)}")
            if root in never:
                out.append(f"{mod} imports {name}: the {floor} floor never imports {root}")
    return out


def _nodes(files: dict[str, Path], skip: str):
    """(module, node) for every AST node of every module but `skip` (the one module a rule allows)."""
    for mod, path in sorted(files.items()):
        if mod != skip:
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                yield mod, node


TAG = re.compile(r"(cpmant|mlflow)\.[a-z0-9_]+(\.[a-z0-9_]*)*")


def tag_literals(files: dict[str, Path]) -> list[str]:
    """"cpmant.x" strings outside registry/tags.py and "mlflow.x" strings outside registry/ that are no module
    names (run tags are; `python -m cpmant.training` is not)."""
    out = []
    for mod, node in _nodes(files, "registry.tags"):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str) and TAG.fullmatch(node.value)):
            continue
        s = node.value
        if s.endswith((".weight", ".bias")):  # a state-dict key of CPM-Live's layout (cpmant/convert.py)
            continue
        if s.rstrip(".") in files or s.startswith("mlflow.") and (mod.startswith("registry.") or _is_module(s)):
            continue
        out.append(f"{mod}:{node.lineno}: {s!r}")
    return out


def _is_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def long_cuts(files: dict[str, Path]) -> list[str]:
    """`x[:N]` with a constant N >= 480 (MLflow's limits) outside registry/limits.py."""
    return [f"{mod}:{node.lineno}: [:{node.upper.value}]" for mod, node in _nodes(files, "registry.limits")
            if isinstance(node, ast.Slice) and isinstance(node.upper, ast.Constant)
            and isinstance(node.upper.value, int) and node.upper.value >= 480]


def hashlib_uses(files: dict[str, Path]) -> list[str]:
    """hashlib used for anything but blake2b outside cpmant/hashing.py."""
    out = []
    for mod, node in _nodes(files, "cpmant.hashing"):
        if isinstance(node, ast.Attribute) and getattr(node.value, "id", "") == "hashlib" and node.attr != "blake2b":
            out.append(f"{mod}:{node.lineno}: hashlib.{node.attr}")
        if isinstance(node, ast.ImportFrom) and node.module == "hashlib":
            out.append(f"{mod}:{node.lineno}: from hashlib import ...")
    return out


# ---- the checks, each tested on a case that must fail ----------------------------------------------------------

def test_the_doc_table_names_every_floor():
    rules = floor_rules()
    assert set(rules) == set(FLOORS)
    assert rules["cpmant"] == ({"cpmant"}, {"prefect", "mlflow", "codecarbon"})
    assert "mlflow" not in rules["registry"][1] and all("mlflow" in rules[f][1] for f in FLOORS if f != "registry")
    assert rules["flows"][0] == {"tasks", "flows"}


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_checks_catch_what_they_forbid(tmp_path):
    src = tmp_path / "flows"
    src.mkdir()
    bad = src / "bad.py"
    bad.write_text("import mlflow\nfrom registry.tags import STAGE\nimport hashlib\n"
                   "def f(x):\n    from cpmant.errors import CpmantError\n"
                   "    return hashlib.sha256(x[:500]).hexdigest(), 'cpmant.stage'\n", encoding="utf-8")
    files = {"flows.bad": bad}
    found = floor_violations(files, floor_rules())
    assert any("registry.tags" in v for v in found) and any("cpmant.errors" in v for v in found)
    assert any("never imports mlflow" in v for v in found)
    assert tag_literals(files) == ["flows.bad:6: 'cpmant.stage'"]
    assert long_cuts(files) == ["flows.bad:6: [:500]"]
    assert hashlib_uses(files) == ["flows.bad:6: hashlib.sha256"]


@pytest.fixture(scope="module")
def files():
    return module_files()


def test_no_import_cycle(files):
    graph = import_graph(files)
    assert {"cpmant.model", "registry.tags", "tasks.reuse", "flows.lifecycle", "cpmant_cli.main"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_each_floor_imports_what_its_row_allows(files):
    assert floor_violations(files, floor_rules()) == []


def test_checkpoints_never_import_compression(files):
    graph = import_graph(files)
    for mod in ("cpmant.checkpoint", "cpmant.factory", "cpmant.model", "cpmant.modules.quant", "cpmant.modules.moe"):
        assert not [d for d in graph[mod] if d.startswith("cpmant.compress")], mod


def test_tag_names_live_in_registry_tags(files):
    assert tag_literals(files) == []


def test_mlflow_limits_live_in_registry_limits(files):
    assert long_cuts(files) == []


def test_identity_hashes_go_through_cpmant_hashing(files):
    assert hashlib_uses(files) == []


def test_every_core_module_imports_on_its_own(files):
    """Every cpmant/ module imports, and importing all of them loads neither Prefect nor MLflow."""
    import subprocess
    import sys

    mods = sorted(m for m in files if m.split(".")[0] == "cpmant" and not m.endswith("__main__"))
    code = ("import importlib, sys\n"
            f"for m in {mods!r}:\n    importlib.import_module(m)\n"
            "print(sorted(k for k in ('prefect', 'mlflow') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
