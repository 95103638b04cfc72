"""The slice of OData URL syntax the Dataverse emulator understands: ``$filter``, keys, ``$select``.

Pure functions over already percent-decoded text, so they can be fuzzed without a server.
The emulator is only useful if it is as strict as Dataverse: anything outside the supported
grammar raises :class:`ODataSyntaxError` (answered as Dataverse's 400 ``0x80060888``) instead
of being guessed at, so a client that builds a broken filter fails here the way it would in
production.  String comparisons are case-insensitive and ignore trailing spaces, as SQL
Server's default collation (behind Dataverse) does.

Supported ``$filter`` grammar (keywords are lower case, as the OData parser requires)::

    expr    := or
    or      := and ("or" and)*
    and     := unary ("and" unary)*
    unary   := "not" unary | primary
    primary := "(" expr ")"
             | ("contains" | "startswith" | "endswith") "(" ident "," literal ")"
             | ident ("eq" | "ne" | "gt" | "ge" | "lt" | "le") literal
    literal := 'text with '' doubled' | null | true | false | number | guid | datetime
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import unquote

SYNTAX_ERROR_CODE = "0x80060888"

_GUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_NUMBER_RE = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_DATETIME_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,7})?)?(Z|[+-][0-9]{2}:[0-9]{2}))?"
)
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORD_RE = re.compile(r"[A-Za-z0-9_.:+\-]+")

COMPARISONS = frozenset({"eq", "ne", "gt", "ge", "lt", "le"})
FUNCTIONS = frozenset({"contains", "startswith", "endswith"})


class ODataSyntaxError(ValueError):
    """A filter, key or query option Dataverse would refuse with 400 ``0x80060888``."""

    code = SYNTAX_ERROR_CODE

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.position = position


@dataclass(frozen=True)
class Guid:
    """An unquoted GUID literal (``systemuserid eq 5f…``), kept apart from quoted strings."""

    value: str  # lower case


Value = str | int | float | bool | None | Guid | datetime


@dataclass(frozen=True)
class Comparison:
    prop: str
    op: str
    value: Value


@dataclass(frozen=True)
class Function:
    name: str
    prop: str
    value: Value


@dataclass(frozen=True)
class And:
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Or:
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Not:
    inner: Expr


Expr = Comparison | Function | And | Or | Not


# ---------------------------------------------------------------------------------------------
# Literals


def quote_literal(value: str) -> str:
    """The OData string literal for ``value``: single quotes, embedded quotes doubled.

    URL encoding is a separate, later step (the HTTP client's job), as on the real wire.
    """
    return "'" + value.replace("'", "''") + "'"


def _syntax(text: str, position: int) -> ODataSyntaxError:
    return ODataSyntaxError(f"Syntax error at position {position} in '{text}'.", position)


def _read_string(text: str, start: int) -> tuple[str, int]:
    """Read the quoted literal starting at ``text[start] == "'"``; return (value, index after)."""
    out: list[str] = []
    i = start + 1
    while True:
        j = text.find("'", i)
        if j < 0:
            # Worded and positioned (at the end of the text) as Dataverse answers it: Learn, "Filter
            # rows using OData" quotes "There is an unterminated literal at position 21 in
            # 'lastname eq 'O'Bryan''."
            raise ODataSyntaxError(
                f"There is an unterminated literal at position {len(text)} in '{text}'.", len(text)
            )
        out.append(text[i:j])
        if j + 1 < len(text) and text[j + 1] == "'":
            out.append("'")
            i = j + 2
            continue
        return "".join(out), j + 1


def _word_value(word: str, text: str, position: int) -> Value:
    """The value of an unquoted literal word, or a syntax error."""
    low = word.lower()
    if low == "null":
        return None
    if low == "true":
        return True
    if low == "false":
        return False
    if _GUID_RE.fullmatch(word):
        return Guid(word.lower())
    if _NUMBER_RE.fullmatch(word):
        if any(c in word for c in ".eE"):
            return float(word)
        return int(word)
    if _DATETIME_RE.fullmatch(word):
        parsed = datetime.fromisoformat(word.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise _syntax(text, position)


# ---------------------------------------------------------------------------------------------
# $filter


@dataclass(frozen=True)
class _Token:
    kind: str  # "(" ")" "," "str" "word"
    text: str
    pos: int


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c in " \t":
            i += 1
        elif c in "(),":
            tokens.append(_Token(c, c, i))
            i += 1
        elif c == "'":
            value, end = _read_string(text, i)
            tokens.append(_Token("str", value, i))
            i = end
        else:
            m = _WORD_RE.match(text, i)
            if not m:
                raise ODataSyntaxError(
                    f"Syntax error: character '{c}' is not valid at position {i} in '{text}'.", i
                )
            tokens.append(_Token("word", m.group(0), i))
            i = m.end()
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def _peek(self) -> _Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _here(self) -> int:
        tok = self._peek()
        return tok.pos if tok else len(self.text)

    def _is_word(self, word: str) -> bool:
        tok = self._peek()
        return tok is not None and tok.kind == "word" and tok.text == word

    def _expect(self, kind: str) -> _Token:
        tok = self._peek()
        if tok is None or tok.kind != kind:
            raise _syntax(self.text, self._here())
        self.i += 1
        return tok

    def parse(self) -> Expr:
        if not self.tokens:
            raise _syntax(self.text, 0)
        expr = self._or()
        if self._peek() is not None:
            raise _syntax(self.text, self._here())
        return expr

    def _or(self) -> Expr:
        left = self._and()
        while self._is_word("or"):
            self.i += 1
            left = Or(left, self._and())
        return left

    def _and(self) -> Expr:
        left = self._unary()
        while self._is_word("and"):
            self.i += 1
            left = And(left, self._unary())
        return left

    def _unary(self) -> Expr:
        if self._is_word("not"):
            self.i += 1
            return Not(self._unary())
        return self._primary()

    def _ident(self) -> str:
        tok = self._expect("word")
        if not _IDENT_RE.fullmatch(tok.text) or tok.text in COMPARISONS or tok.text in ("and", "or", "not"):
            raise _syntax(self.text, tok.pos)
        return tok.text

    def _literal(self) -> Value:
        tok = self._peek()
        if tok is None:
            raise _syntax(self.text, len(self.text))
        self.i += 1
        if tok.kind == "str":
            return tok.text
        if tok.kind == "word":
            return _word_value(tok.text, self.text, tok.pos)
        raise _syntax(self.text, tok.pos)

    def _primary(self) -> Expr:
        tok = self._peek()
        if tok is None:
            raise _syntax(self.text, len(self.text))
        if tok.kind == "(":
            self.i += 1
            inner = self._or()
            self._expect(")")
            return inner
        if tok.kind != "word":
            raise _syntax(self.text, tok.pos)
        nxt = self.tokens[self.i + 1] if self.i + 1 < len(self.tokens) else None
        if nxt is not None and nxt.kind == "(":
            if tok.text not in FUNCTIONS:
                raise ODataSyntaxError(
                    f"An unknown function with name '{tok.text}' was found. This may also be a function "
                    "import or a key lookup on a navigation property, which is not allowed.",
                    tok.pos,
                )
            self.i += 2
            prop = self._ident()
            self._expect(",")
            value = self._literal()
            self._expect(")")
            return Function(tok.text, prop, value)
        prop = self._ident()
        op_tok = self._peek()
        if op_tok is None or op_tok.kind != "word" or op_tok.text not in COMPARISONS:
            raise _syntax(self.text, self._here())
        self.i += 1
        return Comparison(prop, op_tok.text, self._literal())


def parse_filter(text: str) -> Expr:
    """Parse a decoded ``$filter`` value; :class:`ODataSyntaxError` for anything unsupported."""
    return _Parser(text).parse()


def properties(expr: Expr) -> set[str]:
    """Every property an expression reads (the emulator checks them against the table)."""
    if isinstance(expr, Comparison | Function):
        return {expr.prop}
    if isinstance(expr, Not):
        return properties(expr.inner)
    return properties(expr.left) | properties(expr.right)


_OPERATOR_KINDS = {
    "eq": "Equal",
    "ne": "NotEqual",
    "gt": "GreaterThan",
    "ge": "GreaterThanOrEqual",
    "lt": "LessThan",
    "le": "LessThanOrEqual",
}
_NUMERIC_TYPES = frozenset({"Edm.Int32", "Edm.Int64", "Edm.Decimal", "Edm.Double"})


def _literal_type(value: Value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "Edm.Boolean"
    if isinstance(value, int):
        return "Edm.Int32"
    if isinstance(value, float):
        return "Edm.Double"
    if isinstance(value, Guid):
        return "Edm.Guid"
    if isinstance(value, datetime):
        return "Edm.DateTimeOffset"
    return "Edm.String"


def check_types(expr: Expr, type_of: Callable[[str], str | None]) -> None:
    """Refuse comparisons the OData parser refuses, e.g. a GUID property against a quoted string.

    ``type_of`` gives a property's Edm type name, None for unchecked ones.  A quoted GUID
    (``systemuserid eq '…'``) is the classic client bug this catches.
    """
    if isinstance(expr, And | Or):
        check_types(expr.left, type_of)
        check_types(expr.right, type_of)
        return
    if isinstance(expr, Not):
        check_types(expr.inner, type_of)
        return
    prop_type = type_of(expr.prop)
    literal_type = _literal_type(expr.value)
    if isinstance(expr, Function):
        if (prop_type is not None and prop_type != "Edm.String") or literal_type not in (None, "Edm.String"):
            raise ODataSyntaxError(
                f"No function signature for the function with name '{expr.name}' matches the specified "
                f"arguments. The function signatures considered are: {expr.name}(Edm.String Nullable=true, "
                "Edm.String Nullable=true)."
            )
        return
    if prop_type is None or literal_type is None or prop_type == literal_type:
        return
    if prop_type in _NUMERIC_TYPES and literal_type in _NUMERIC_TYPES:
        return
    raise ODataSyntaxError(
        "A binary operator with incompatible types was detected. Found operand types "
        f"'{prop_type}' and '{literal_type}' for operator kind '{_OPERATOR_KINDS[expr.op]}'."
    )


def _norm(value: object) -> object:
    """Comparable form: strings case-folded without trailing spaces, GUIDs lower case."""
    if isinstance(value, Guid):
        return value.value
    if isinstance(value, str):
        return value.rstrip(" ").lower()
    return value


def _as_datetime(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _both_numbers(a: object, b: object) -> bool:
    return isinstance(a, int | float) and isinstance(b, int | float)


def _compare(actual: object, op: str, literal: Value) -> bool:
    if literal is None:
        if op == "eq":
            return actual is None
        if op == "ne":
            return actual is not None
        return False
    if actual is None:
        return False  # SQL: a comparison with NULL is never true
    left: object
    right: object
    if isinstance(literal, datetime):
        left, right = _as_datetime(actual), literal
        if left is None:
            return False
    elif isinstance(literal, bool) or isinstance(actual, bool) or _both_numbers(actual, literal):
        left, right = actual, literal
    else:
        left, right = _norm(actual), _norm(literal)
        if not isinstance(left, str) or not isinstance(right, str):
            left, right = str(left), str(right)
    if op == "eq":
        return left == right
    if op == "ne":
        return left != right
    try:
        if op == "gt":
            return left > right  # type: ignore[operator]
        if op == "ge":
            return left >= right  # type: ignore[operator]
        if op == "lt":
            return left < right  # type: ignore[operator]
        return left <= right  # type: ignore[operator]
    except TypeError:
        return False


def evaluate(expr: Expr, record: Mapping[str, object]) -> bool:
    """Whether ``record`` matches ``expr`` (missing properties read as null)."""
    if isinstance(expr, Comparison):
        return _compare(record.get(expr.prop), expr.op, expr.value)
    if isinstance(expr, Function):
        actual = record.get(expr.prop)
        if actual is None or expr.value is None:
            return False
        hay = str(_norm(actual))
        needle = str(expr.value.value if isinstance(expr.value, Guid) else expr.value).lower()
        if expr.name == "contains":
            return needle in hay
        if expr.name == "startswith":
            return hay.startswith(needle)
        return hay.endswith(needle)
    if isinstance(expr, Not):
        return not evaluate(expr.inner, record)
    if isinstance(expr, And):
        return evaluate(expr.left, record) and evaluate(expr.right, record)
    return evaluate(expr.left, record) or evaluate(expr.right, record)


# ---------------------------------------------------------------------------------------------
# Resource paths and keys


@dataclass(frozen=True)
class ResourcePath:
    """``contacts(emailaddress1='a@b.com')/rest`` split into its parts (key text still raw)."""

    name: str
    key: str | None  # text between the parentheses, None when the segment has none
    rest: str  # what follows a "/" after the first segment ("" when nothing)


def decode_path(raw: str) -> str:
    """Percent-decode a raw request path exactly once ("+" stays "+": this is a path, not a form).

    The emulator reads the raw path (werkzeug decodes ``%2F`` in PATH_INFO before routing, which
    would split a key value containing "/"), then decodes it here, strictly: bytes that are not
    UTF-8 are a bad request, not replacement characters.
    """
    try:
        return unquote(raw, encoding="utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise ODataSyntaxError(f"The request path is not valid UTF-8: {exc.reason}.", exc.start) from exc


def split_resource(path: str) -> ResourcePath:
    """Split a decoded path below ``/api/data/vX.Y/``; parentheses inside quotes do not count."""
    m = re.match(r"[A-Za-z_$][A-Za-z0-9_.$]*", path)
    if not m:
        raise ODataSyntaxError(f"Resource not found for the segment '{path.split('/')[0]}'.", 0)
    name = m.group(0)
    i = m.end()
    key: str | None = None
    if i < len(path) and path[i] == "(":
        j = i + 1
        in_quote = False
        while j < len(path):
            c = path[j]
            if c == "'":
                in_quote = not in_quote  # a doubled quote toggles twice: still correct
            elif c == ")" and not in_quote:
                break
            j += 1
        if j >= len(path):
            raise _syntax(path, i)
        key = path[i + 1 : j]
        i = j + 1
    rest = path[i:]
    if rest and not rest.startswith("/"):
        raise ODataSyntaxError(f"Resource not found for the segment '{path}'.", i)
    return ResourcePath(name, key, rest[1:] if rest else "")


def parse_key(text: str) -> str | dict[str, Value]:
    """A key segment: a bare GUID (returned lower case) or ``name=literal[,name=literal…]``.

    Named parts keep their literal types (``accountnumber='1'`` is a string, ``=1`` an int);
    a repeated name or an empty part is a syntax error, as Dataverse refuses them too.
    """
    stripped = text.strip(" ")
    if _GUID_RE.fullmatch(stripped):
        return stripped.lower()
    if not stripped:
        raise _syntax(text, 0)
    parts: dict[str, Value] = {}
    i = 0
    n = len(text)
    while True:
        while i < n and text[i] == " ":
            i += 1
        m = _IDENT_RE.match(text, i)
        if not m:
            raise _syntax(text, i)
        name = m.group(0)
        i = m.end()
        while i < n and text[i] == " ":
            i += 1
        if i >= n or text[i] != "=":
            raise _syntax(text, i)
        i += 1
        while i < n and text[i] == " ":
            i += 1
        value: Value
        if i < n and text[i] == "'":
            value, i = _read_string(text, i)
        else:
            w = _WORD_RE.match(text, i)
            if not w:
                raise _syntax(text, i)
            value = _word_value(w.group(0), text, i)
            i = w.end()
        if name in parts:
            raise _syntax(text, m.start())
        parts[name] = value
        while i < n and text[i] == " ":
            i += 1
        if i >= n:
            return parts
        if text[i] != ",":
            raise _syntax(text, i)
        i += 1


def parse_select(text: str) -> list[str]:
    """``$select=a,b`` -> ``["a", "b"]``; anything but plain property names is a syntax error."""
    names: list[str] = []
    pos = 0
    for part in text.split(","):
        name = part.strip(" ")
        if not _IDENT_RE.fullmatch(name):
            raise _syntax(text, pos)
        names.append(name)
        pos += len(part) + 1
    return names


def key_value_text(value: Value) -> str:
    """How a key value is written back into a URL segment (the inverse of the key parser)."""
    if isinstance(value, str):
        return quote_literal(value)
    if isinstance(value, Guid):
        return value.value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return repr(value)
