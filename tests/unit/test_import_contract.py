"""The import rules import-linter cannot state: function_app.py is a root module (not a package), and
"shared/ never imports azure.functions" concerns a subpackage of an external package.  The rest is in
``.importlinter`` and runs in ``make lint``; it runs here too so a plain ``pytest`` run catches it."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOT_DEPLOYED = ("devstack", "bench", "tools", "tests")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions count too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_imported_modules_sees_lazy_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from devstack import control\n    import bench.runner\n")
    assert imported_modules(sample) == {"devstack", "bench.runner"}


def test_function_app_imports_nothing_that_is_not_deployed() -> None:
    bad = {m for m in imported_modules(ROOT / "function_app.py") if m.split(".")[0] in NOT_DEPLOYED}
    assert not bad, f"function_app.py imports {sorted(bad)}, which .funcignore keeps out of the package"


@pytest.mark.parametrize("path", sorted((ROOT / "shared").glob("*.py")), ids=lambda p: p.name)
def test_shared_is_plain_python(path: Path) -> None:
    bad = {m for m in imported_modules(path) if m == "azure.functions" or m.startswith("function_app")}
    assert not bad, f"shared/{path.name} imports {sorted(bad)}: shared/ must be testable without the host"


def test_import_linter_contracts_are_kept() -> None:
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint_imports is None:
        pytest.fail("import-linter is not installed (requirements-dev.txt)")
    run = subprocess.run(
        [lint_imports, "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout
