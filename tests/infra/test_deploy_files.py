"""azure.yaml, infra/main.bicepparam and .funcignore: the files `azd up` and `func ... publish` read."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pathspec
import pytest
import yaml

from shared.settings import SETTINGS
from tests.infra.bicep import Infra
from tests.infra.conftest import INFRA, ROOT

_PARAM = re.compile(r"^param\s+(\w+)\s*=\s*(.+)$", re.MULTILINE)
_ENV = re.compile(r"readEnvironmentVariable\('([A-Z0-9_]+)'(?:,\s*'([^']*)')?\)")


def bicepparam() -> dict[str, str]:
    text = (INFRA / "main.bicepparam").read_text()
    assert re.search(r"^using '\./main\.bicep'$", text, re.MULTILINE), "main.bicepparam must use ./main.bicep"
    return dict(_PARAM.findall(text))


def test_bicepparam_sets_only_declared_parameters_and_every_required_one(infra: Infra) -> None:
    values = bicepparam()
    declared = infra.main.parameters
    assert set(values) <= set(declared), f"unknown parameters: {sorted(set(values) - set(declared))}"
    required = {name for name in declared if infra.main.default(name) is None}
    assert required <= set(values), f"required but not set: {sorted(required - set(values))}"


def test_bicepparam_reads_the_environment_with_main_bicep_defaults(infra: Infra) -> None:
    """One file for azd (its environment) and az (exported variables); fallbacks agree with main.bicep."""
    for name, expr in bicepparam().items():
        match = _ENV.search(expr)
        assert match, f"{name} must come from readEnvironmentVariable(...)"
        variable, fallback = match.groups()
        default = infra.main.default(name)
        if default is None and name not in {"environmentName"}:
            assert fallback is None, (
                f"{name} is required: no fallback, so a missing {variable} stops the deployment"
            )
        elif isinstance(default, str) and fallback is not None and not expr.startswith("split("):
            assert fallback == default, f"{name}: fallback {fallback!r} differs from main.bicep's {default!r}"
    values = bicepparam()
    assert "AZURE_ENV_NAME" in values["environmentName"] and "AZURE_PRINCIPAL_ID" in values["principalId"]
    for name in ("dataverseClientSecret", "webhookSigningSecret"):
        assert infra.main.is_secure(name) and _ENV.search(values[name]).groups()[1] == ""  # type: ignore[union-attr]


# Neither required nor an app setting, but they choose how the app runs: a redeploy must keep them.
_MODE_PARAMETERS = {"dataverseAppUniqueName": "DATAVERSE_APP_UNIQUE_NAME"}


def _description(infra: Infra, name: str) -> str:
    for decorator in infra.main.parameters[name].get("decorators") or []:
        if decorator.get("type") == "description":
            return str(decorator["argument"])
    return ""


def test_bicepparam_reads_every_product_setting_from_its_environment_variable(infra: Infra) -> None:
    """A setting changed with `azd env set` must survive the next `azd up`.

    A main.bicep parameter that only keeps its default is reset to it by every deployment: with
    DATAVERSE_CREDENTIAL that silently switched a migrated app back to 'secret'.  So every parameter that
    is required, deploys an app setting (its description starts with the setting's name) or picks a mode
    is read from the environment variable of the same name.
    """
    settings = {spec.name for spec in SETTINGS}
    values = bicepparam()
    expected: dict[str, str | None] = {}
    for name in infra.main.parameters:
        setting = _description(infra, name).split(":", 1)[0]
        if setting in settings:
            expected[name] = setting
        elif name in _MODE_PARAMETERS:
            expected[name] = _MODE_PARAMETERS[name]
        elif infra.main.default(name) is None:
            expected[name] = None
    assert {"dataverseCredential", "jobDeadlineSeconds", "httpMaxWaitSeconds"} <= set(expected)
    for name, variable in expected.items():
        assert name in values, f"{name} is not read from the environment in main.bicepparam"
        match = _ENV.search(values[name])
        assert match, f"{name} must come from readEnvironmentVariable(...)"
        if variable is not None:
            assert match.group(1) == variable, f"{name} must read {variable}, not {match.group(1)}"


def test_azure_yaml_declares_the_function_service() -> None:
    config = yaml.safe_load((ROOT / "azure.yaml").read_text())
    assert config["name"]
    assert config["services"] == {"api": {"project": ".", "language": "python", "host": "function"}}
    assert config["infra"] == {"provider": "bicep", "path": "infra", "module": "main"}


def test_azd_service_tag_matches_azure_yaml(infra: Infra) -> None:
    config = yaml.safe_load((ROOT / "azure.yaml").read_text())
    site = infra["functionapp"].resource("Microsoft.Web/sites")
    tag = site.get("tags")["function"]["parameters"]["arg_2"]
    assert list(config["services"]) == [value for value in tag.values()]


SHIPPED = ["function_app.py", "host.json", "requirements.txt", "shared/__init__.py", "shared/settings.py"]
KEPT_OUT = [
    "tests/unit/test_x.py",
    "devstack/host.py",
    "infra/main.bicep",
    "bench/run.py",
    "tools/queuectl.py",
    "docs/design.md",
    "node_modules/azurite/package.json",
    ".venv/bin/python",
    ".venv-checkov/bin/checkov",
    "local.settings.json",
    ".git/HEAD",
    "azure.yaml",
    ".azure/dev/.env",
    "shared/__pycache__/x.cpython-311.pyc",
    ".pytest_cache/v/x",
    ".mypy_cache/x",
    ".devstack/state.json",
    "package.json",
    "package-lock.json",
    "Makefile",
    "requirements-dev.txt",
    "requirements-bench.txt",
    "requirements-checkov.txt",
    ".bench-logs/run.log",
    "README.md",
]


@pytest.fixture(scope="module")
def funcignore() -> pathspec.GitIgnoreSpec:
    return pathspec.GitIgnoreSpec.from_lines((ROOT / ".funcignore").read_text().splitlines())


@pytest.mark.parametrize("path", KEPT_OUT)
def test_funcignore_keeps_out_of_the_package(funcignore: pathspec.GitIgnoreSpec, path: str) -> None:
    assert funcignore.match_file(path), f"{path} would be deployed"


@pytest.mark.parametrize("path", SHIPPED)
def test_funcignore_ships_the_app(funcignore: pathspec.GitIgnoreSpec, path: str) -> None:
    assert not funcignore.match_file(path), f"{path} would be left out of the deployment"


def test_every_shipped_python_file_is_app_code(funcignore: pathspec.GitIgnoreSpec) -> None:
    """Whatever exists in the tree today: only function_app.py and shared/ ship as Python."""
    shipped = []
    for directory, subdirs, files in os.walk(ROOT):
        relative = Path(directory).relative_to(ROOT)
        subdirs[:] = [d for d in subdirs if not funcignore.match_file(f"{(relative / d).as_posix()}/")]
        shipped += [
            (relative / f).as_posix()
            for f in files
            if f.endswith(".py") and not funcignore.match_file((relative / f).as_posix())
        ]
    assert "function_app.py" in shipped or not (ROOT / "function_app.py").exists()
    stray = [p for p in shipped if p != "function_app.py" and not p.startswith("shared/")]
    assert not stray, f"would be deployed: {stray}"


# The package is function_app.py, host.json, requirements.txt and shared/ (plus .funcignore itself).
PACKAGE_ROOT = {"function_app.py", "host.json", "requirements.txt", "shared", ".funcignore"}


def test_every_top_level_entry_is_shipped_on_purpose(funcignore: pathspec.GitIgnoreSpec) -> None:
    """A new top-level file or folder (logs, caches, tool configs) must be listed in .funcignore or here."""
    stray = [
        entry.name
        for entry in ROOT.iterdir()
        if entry.name not in PACKAGE_ROOT
        and not funcignore.match_file(entry.name + ("/" if entry.is_dir() else ""))
    ]
    assert not stray, f"would be deployed from the working tree: {sorted(stray)}"


_README_OUTPUT = re.compile(r"properties\.outputs\.([A-Za-z0-9_]+)\.value|azd env get-value ([A-Z0-9_]+)")


def test_readme_reads_only_outputs_main_bicep_has(infra: Infra) -> None:
    """The Deploy section finds the app and the vault by deployment output, never by `list ... [0]`."""
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Deploy to Azure")
    end = text.find("\n## ", start + 1)
    readme = text[start : end if end != -1 else None]
    named = {a or b for a, b in _README_OUTPUT.findall(readme)}
    assert {"AZURE_FUNCTION_APP_NAME", "AZURE_KEY_VAULT_NAME"} <= named
    assert named <= set(infra.main.outputs), (
        f"not outputs of main.bicep: {sorted(named - set(infra.main.outputs))}"
    )
    assert "--query '[0].name'" not in readme, (
        "picking the first app or vault of a resource group may pick another's"
    )
