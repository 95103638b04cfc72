"""A small reader over pycep's JSON of the Bicep templates, so the infra tests read like the templates.

pycep keeps an identifier and a string literal alike as a bare Python string (``name: appName`` and
``name: 'appName'`` both give ``"appName"``), so reference-finding here is deliberately conservative:
a string that *could* name a symbol counts as a reference to it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pycep import BicepParser

_PARSER = BicepParser()
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INTERPOLATION = re.compile(r"\$\{([^}]*)\}")


def parse(path: Path) -> dict[str, Any]:
    return dict(_PARSER.parse(file_path=path))


def identifiers(expr: object) -> set[str]:
    """Every name an expression may refer to (bare strings, interpolations, accessors, calls)."""
    found: set[str] = set()
    if isinstance(expr, str):
        if _IDENTIFIER.fullmatch(expr):
            found.add(expr)
        for inner in _INTERPOLATION.findall(expr):
            found.update(_IDENTIFIER.findall(inner))
    elif isinstance(expr, Mapping):
        for value in expr.values():
            found |= identifiers(value)
    elif isinstance(expr, list):
        for item in expr:
            found |= identifiers(item)
    return found


def accessor_chain(expr: object) -> list[str]:
    """``identity.outputs.clientId`` -> ``["identity", "outputs", "clientId"]``; [] if not an accessor."""
    if isinstance(expr, str):
        return [expr] if _IDENTIFIER.fullmatch(expr) else []
    if isinstance(expr, Mapping):
        operator = expr.get("operator")
        if isinstance(operator, Mapping) and operator.get("type") == "property_accessor":
            operands = operator["operands"]
            head = accessor_chain(operands["operand_1"])
            tail = accessor_chain(operands["operand_2"])
            return head + tail if head and tail else []
    return []


def call(expr: object, function: str) -> Mapping[str, Any] | None:
    """The parameters of ``function(...)`` if ``expr`` is that call, else None."""
    if isinstance(expr, Mapping):
        fn = expr.get("function")
        if isinstance(fn, Mapping) and fn.get("type") == function:
            parameters: Mapping[str, Any] = fn["parameters"]
            return parameters
    return None


@dataclass(frozen=True)
class Resource:
    symbol: str
    type: str
    api_version: str
    existing: bool
    body: Mapping[str, Any]
    condition: object = None  # the `if (...)` expression, None when unconditional
    loop: Mapping[str, Any] | None = None  # pycep's loop_type when declared with `[for ...]`

    def get(self, path: str, default: object = None) -> Any:
        """``get("properties.siteConfig.minTlsVersion")``; ``default`` when any step is missing."""
        node: Any = self.body
        for step in path.split("."):
            if not isinstance(node, Mapping) or step not in node:
                return default
            node = node[step]
        return node


@dataclass(frozen=True)
class Template:
    path: Path
    json: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def parameters(self) -> Mapping[str, Mapping[str, Any]]:
        return self.json.get("parameters") or {}

    @property
    def variables(self) -> Mapping[str, Any]:
        return {name: var["value"] for name, var in (self.json.get("variables") or {}).items()}

    @property
    def outputs(self) -> Mapping[str, Mapping[str, Any]]:
        return self.json.get("outputs") or {}

    @property
    def modules(self) -> Mapping[str, Mapping[str, Any]]:
        return self.json.get("modules") or {}

    def resources(self, type_: str | None = None) -> list[Resource]:
        found = []
        for symbol, raw in (self.json.get("resources") or {}).items():
            if type_ is not None and raw["type"].lower() != type_.lower():
                continue
            config = raw["config"]
            condition, loop = None, None
            if "loop_type" in config:
                loop, condition, config = config["loop_type"], config.get("condition"), config["config"]
            elif "condition" in config and "config" in config:
                condition, config = config["condition"], config["config"]
            found.append(
                Resource(symbol, raw["type"], raw["api_version"], raw["existing"], config, condition, loop)
            )
        return found

    def resource(self, type_: str) -> Resource:
        """The one resource of that type that this template creates (not `existing`)."""
        matches = [r for r in self.resources(type_) if not r.existing]
        assert len(matches) == 1, f"{self.name}: expected one {type_}, found {[r.symbol for r in matches]}"
        return matches[0]

    def symbol(self, name: str) -> Resource:
        matches = [r for r in self.resources() if r.symbol == name]
        assert matches, f"{self.name}: no resource symbol {name!r}"
        return matches[0]

    def is_secure(self, param: str) -> bool:
        decorators = self.parameters[param].get("decorators") or []
        return any(d.get("type") == "secure" for d in decorators)

    def default(self, param: str) -> Any:
        return self.parameters[param].get("default")

    def allowed(self, param: str) -> list[Any] | None:
        for decorator in self.parameters[param].get("decorators") or []:
            if decorator.get("type") == "allowed":
                values: list[Any] = decorator["argument"]
                return values
        return None

    def value(self, expr: object) -> object:
        """Resolve a bare variable name to the variable's value (one level); anything else as is."""
        if isinstance(expr, str) and expr in self.variables:
            return self.variables[expr]
        return expr

    def module_path(self, symbol: str) -> str:
        path: str = self.modules[symbol]["detail"]["path"]
        return path

    def module_params(self, symbol: str) -> Mapping[str, Any]:
        config = self.modules[symbol]["config"]
        if "condition" in config and "config" in config:
            config = config["config"]
        params: Mapping[str, Any] = config["params"]
        return params


@dataclass(frozen=True)
class Infra:
    root: Path
    templates: Mapping[str, Template] = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path) -> Infra:
        templates = {path.stem: Template(path, parse(path)) for path in sorted(root.rglob("*.bicep"))}
        return cls(root, templates)

    def with_file(self, relative: str, path: Path) -> Infra:
        """This infra with one template read from ``path`` instead (a mutated copy)."""
        template = Template(path, parse(path))
        return replace(self, templates={**self.templates, Path(relative).stem: template})

    @property
    def main(self) -> Template:
        return self.templates["main"]

    def __getitem__(self, name: str) -> Template:
        return self.templates[name]

    def __iter__(self) -> Iterator[Template]:
        return iter(self.templates.values())

    def module_template(self, symbol: str) -> Template:
        """The template main.bicep's module ``symbol`` deploys."""
        return self.templates[Path(self.main.module_path(symbol)).stem]

    def module_symbol(self, template_name: str) -> str:
        """main.bicep's module symbol for ``modules/<template_name>.bicep``."""
        for symbol in self.main.modules:
            if Path(self.main.module_path(symbol)).stem == template_name:
                return symbol
        raise AssertionError(f"main.bicep deploys no module {template_name}.bicep")
