"""The house rules of DESIGN.md that code can check.

The layering is checked statically: every import statement of every module (function-level ones included, and
relative ones resolved) is read with ``ast`` and held against the table in DESIGN's "Layout". Two checks run the
interpreter as well, because what matters there is what importing actually loads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("muai", "orchestrator", "sidecar", "adapters", "detectors", "alerting", "bench", "tests")

# DESIGN "Layout": which of our packages each package may import (itself always). Third-party libraries are free
# except where a rule below says otherwise.
MAY_IMPORT: dict[str, set[str]] = {
    "muai": {"orchestrator", "sidecar"},
    "orchestrator": {"adapters", "detectors"},
    "sidecar": {"detectors", "alerting"},
    "adapters": set(),
    "detectors": set(),
    "alerting": set(),
}
# Departures the code has today, each with its reason; the test fails when one goes away, so the list stays true.
KNOWN_DEPARTURES: dict[tuple[str, str], str] = {
    ("muai/cli.py", "adapters"): "`muai models make-tiny` writes the built-in tiny models with adapters.tiny, in "
                                 "the subcommand's function (the composition root reaching past its floor)",
}
DETECTORS_THIRD_PARTY = {"numpy", "scipy"}
ENGINE_LIBRARIES = {"torch", "transformers", "vllm", "deepspeed", "onnxruntime", "onnx", "onnxscript", "tokenizers"}
# Engines are imported only inside their own adapter module (torch and transformers: the Hugging Face family's).
ENGINE_HOMES = {
    "vllm": {"adapters/vllm_engine.py", "adapters/vllm_runtime.py"},
    "deepspeed": {"adapters/deepspeed_engine.py"},
    "onnxruntime": {"adapters/onnx_engine.py", "adapters/onnx_export.py"},
    "onnx": {"adapters/onnx_engine.py", "adapters/onnx_export.py"},
    "onnxscript": {"adapters/onnx_engine.py", "adapters/onnx_export.py"},
}


@dataclass(frozen=True)
class Import:
    file: str
    """Path relative to the repository root."""
    line: int
    module: str
    """The absolute module name imported (``from x import y`` gives ``x``)."""
    top_level: bool
    """Executed when the module is imported (not inside a function, nor under ``if TYPE_CHECKING``)."""

    @property
    def root(self) -> str:
        return self.module.split(".")[0]

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.module}"


def _package_of(rel: Path) -> list[str]:
    """The package a module's relative imports start from (for ``pkg/__init__.py`` too: ``pkg``)."""
    return list(rel.with_suffix("").parts[:-1])


class _Collector(ast.NodeVisitor):
    def __init__(self, rel: Path) -> None:
        self.rel = rel
        self.package = _package_of(rel)
        self.found: list[Import] = []
        self._depth = 0

    def _add(self, node: ast.AST, module: str) -> None:
        self.found.append(Import(self.rel.as_posix(), node.lineno, module, self._depth == 0))

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        type_only = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
        if type_only:
            self._depth += 1
            for child in node.body:
                self.visit(child)
            self._depth -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package[: len(self.package) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        self._add(node, module)


def _imports(package: str) -> list[Import]:
    out: list[Import] = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT)
        collector = _Collector(rel)
        collector.visit(ast.parse(path.read_text(), filename=str(rel)))
        out.extend(collector.found)
    return out


ALL = {package: _imports(package) for package in MAY_IMPORT}


def _ours(imp: Import) -> bool:
    return imp.root in OURS


def _third_party(imp: Import) -> bool:
    return not _ours(imp) and imp.root not in sys.stdlib_module_names and imp.root != "__future__"


def test_the_scan_sees_function_level_and_relative_imports():
    """The scanner itself: a function-level import and a relative one are both found and resolved."""
    source = "from . import sibling\n\ndef f():\n    from ..other import thing\n    import torch\n"
    collector = _Collector(Path("adapters/sub/mod.py"))
    collector.visit(ast.parse(source))
    assert [(i.module, i.top_level) for i in collector.found] == [
        ("adapters.sub", True), ("adapters.other", False), ("torch", False)]


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_each_package_imports_only_the_packages_the_table_allows(package):
    allowed = MAY_IMPORT[package] | {package}
    seen_departures = set()
    bad = []
    for imp in ALL[package]:
        if not _ours(imp) or imp.root in allowed:
            continue
        key = (imp.file, imp.root)
        if key in KNOWN_DEPARTURES:
            seen_departures.add(key)
            continue
        bad.append(str(imp))
    assert not bad, f"{package} may import only {sorted(allowed)} of ours:\n" + "\n".join(bad)
    stale = {k for k in KNOWN_DEPARTURES if k[0].startswith(f"{package}/")} - seen_departures
    assert not stale, f"departures listed that the code no longer has (remove them): {sorted(stale)}"


def test_nothing_imports_muai():
    bad = [str(i) for package, imports in ALL.items() if package != "muai" for i in imports if i.root == "muai"]
    assert not bad, "muai is the top floor; nothing imports it:\n" + "\n".join(bad)


def test_orchestrator_and_sidecar_never_import_each_other_statically():
    bad = [str(i) for i in ALL["orchestrator"] if i.root == "sidecar"]
    bad += [str(i) for i in ALL["sidecar"] if i.root == "orchestrator"]
    assert not bad, "the orchestrator and the sidecar meet over HTTP only:\n" + "\n".join(bad)


def test_detectors_import_only_numpy_scipy_and_the_standard_library():
    bad = [str(i) for i in ALL["detectors"] if _third_party(i) and i.root not in DETECTORS_THIRD_PARTY]
    assert not bad, "detectors are pure numerics (numpy, scipy):\n" + "\n".join(bad)


def test_engine_libraries_are_imported_only_inside_functions_of_their_own_adapter():
    bad = []
    for package, imports in ALL.items():
        for imp in imports:
            if imp.root not in ENGINE_LIBRARIES:
                continue
            if package != "adapters":
                bad.append(f"{imp} (engines are imported only in adapters)")
            elif imp.top_level:
                bad.append(f"{imp} (at module level: importing the adapter would import the engine)")
            elif imp.root in ENGINE_HOMES and imp.file not in ENGINE_HOMES[imp.root]:
                bad.append(f"{imp} (outside its engine's own module)")
    assert not bad, "\n".join(bad)


def test_monitoring_packages_never_import_torch():
    code = ("import detectors, alerting, sidecar, adapters, sys; bad = [m for m in ('torch', 'vllm', 'deepspeed', "
            "'onnxruntime', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_orchestrator_and_sidecar_never_import_each_other():
    code = (
        "import sys, orchestrator, orchestrator.server;"
        "assert not any(m == 'sidecar' or m.startswith('sidecar.') for m in sys.modules), 'orchestrator imports sidecar';"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    code = (
        "import sys, sidecar, sidecar.app;"
        "assert not any(m == 'orchestrator' or m.startswith('orchestrator.') for m in sys.modules), 'sidecar imports orchestrator';"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
