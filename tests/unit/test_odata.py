"""The emulator's OData parser: strict like Dataverse, and lossless for any string a client quotes."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import quote, urlsplit

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from devstack.dataverse.odata import (
    And,
    Comparison,
    Function,
    Guid,
    Not,
    ODataSyntaxError,
    Or,
    Value,
    check_types,
    decode_path,
    evaluate,
    key_value_text,
    parse_filter,
    parse_key,
    parse_select,
    properties,
    quote_literal,
    split_resource,
)

ESCAPING_CASES = [
    "o'brien@contoso.com",
    "''",
    "'",
    "a+b@contoso.com",
    "100%",
    "%27",
    "%2B",
    "a&b=c",
    "#hash",
    "?q",
    "sp ace",
    "tab\there",
    "new\nline",
    "élodie@exämple.com",
    "日本語",
    "emoji 🎉",
    "back\\slash",
    "paren)(",
    "slash/ed",
    "",
    " leading and trailing ",
    "\x00nul",
]


def _server_filter(filter_text: str) -> str:
    """What a Flask/werkzeug server reads as ``$filter`` after requests encoded it."""
    prepared = requests.Request(
        "GET", "https://org.example/api/data/v9.2/systemusers", params={"$filter": filter_text}
    ).prepare()
    assert prepared.url is not None
    raw_query = urlsplit(prepared.url).query
    environ = EnvironBuilder(path="/api/data/v9.2/systemusers", query_string=raw_query).get_environ()
    return Request(environ).args["$filter"]


def _email_filter(value: str) -> str:
    return f"internalemailaddress eq {quote_literal(value)}"


@pytest.mark.parametrize("value", ESCAPING_CASES)
def test_quoted_literal_survives_the_wire(value: str) -> None:
    expr = parse_filter(_server_filter(_email_filter(value)))
    assert expr == Comparison("internalemailaddress", "eq", value)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_string_round_trips_through_url_encoding(value: str) -> None:
    expr = parse_filter(_server_filter(_email_filter(value)))
    assert isinstance(expr, Comparison)
    assert expr.value == value


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_string_round_trips_as_an_alternate_key_in_the_path(value: str) -> None:
    raw_path = quote(f"contacts(emailaddress1={quote_literal(value)})", safe="")
    resource = split_resource(decode_path(raw_path))
    assert resource.name == "contacts"
    assert resource.rest == ""
    assert resource.key is not None
    assert parse_key(resource.key) == {"emailaddress1": value}


def test_unescaped_quote_is_refused_not_guessed() -> None:
    with pytest.raises(ODataSyntaxError) as err:
        parse_filter("internalemailaddress eq 'o'brien@contoso.com'")
    assert err.value.code == "0x80060888"
    assert err.value.message.startswith("Syntax error")
    assert "position 32" in err.value.message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name eq 'x", "There is an unterminated literal at position 10 in 'name eq 'x'."),
        (  # Learn, "Filter rows using OData"
            "lastname eq 'O'Bryan'",
            "There is an unterminated literal at position 21 in 'lastname eq 'O'Bryan''.",
        ),
        ("name eqq 'x'", "Syntax error at position 5 in 'name eqq 'x''."),
        ("name EQ 'x'", "Syntax error at position 5 in 'name EQ 'x''."),
        ("", "Syntax error at position 0 in ''."),
        ("a eq 1 and", "Syntax error at position 10 in 'a eq 1 and'."),
        ("(a eq 1", "Syntax error at position 7 in '(a eq 1'."),
        ("a eq 1)", "Syntax error at position 6 in 'a eq 1)'."),
        ("a/b eq 1", "Syntax error: character '/' is not valid at position 1 in 'a/b eq 1'."),
        ("a eq bare", "Syntax error at position 5 in 'a eq bare'."),
    ],
)
def test_syntax_errors_carry_position_and_text(text: str, message: str) -> None:
    with pytest.raises(ODataSyntaxError) as err:
        parse_filter(text)
    assert err.value.message == message


def test_unknown_function_is_named() -> None:
    with pytest.raises(ODataSyntaxError, match="unknown function with name 'substringof'"):
        parse_filter("substringof('x', name)")


def test_precedence_and_parentheses() -> None:
    assert parse_filter("a eq 1 or b eq 2 and c eq 3") == Or(
        Comparison("a", "eq", 1), And(Comparison("b", "eq", 2), Comparison("c", "eq", 3))
    )
    assert parse_filter("(a eq 1 or b eq 2) and not c eq 3") == And(
        Or(Comparison("a", "eq", 1), Comparison("b", "eq", 2)), Not(Comparison("c", "eq", 3))
    )


def test_literal_types() -> None:
    guid = "5F0E4E4D-0000-4000-8000-0000000000AA"
    expr = parse_filter(
        f"a eq null and b eq true and c eq False and d eq -12 and e eq 1.5 and f eq {guid}"
        " and g gt 2024-05-01T10:00:00Z and h eq ''"
    )
    values = []
    node = expr
    while isinstance(node, And):
        assert isinstance(node.right, Comparison)
        values.append(node.right.value)
        node = node.left
    assert isinstance(node, Comparison)
    values.append(node.value)
    assert list(reversed(values)) == [
        None,
        True,
        False,
        -12,
        1.5,
        Guid(guid.lower()),
        datetime(2024, 5, 1, 10, tzinfo=UTC),
        "",
    ]


def test_comparisons_are_case_insensitive_like_dataverse() -> None:
    record = {"internalemailaddress": "O'Brien@Contoso.com", "fullname": None, "n": 5}
    assert evaluate(parse_filter("internalemailaddress eq 'o''brien@contoso.COM'"), record)
    assert evaluate(parse_filter("internalemailaddress eq 'o''brien@contoso.com  '"), record)
    assert not evaluate(parse_filter("internalemailaddress ne 'O''BRIEN@contoso.com'"), record)
    assert evaluate(parse_filter("startswith(internalemailaddress,'o''b')"), record)
    assert evaluate(parse_filter("contains(internalemailaddress,'CONTOSO')"), record)
    assert evaluate(parse_filter("endswith(internalemailaddress,'.com')"), record)
    assert evaluate(parse_filter("fullname eq null"), record)
    assert not evaluate(parse_filter("fullname ne 'x'"), record)  # SQL: NULL <> 'x' is not true
    assert evaluate(parse_filter("n gt 4 and n le 5 and not n lt 5"), record)
    assert not evaluate(parse_filter("missing eq 'x'"), record)


def test_guid_literal_matches_stored_guid_whatever_the_case() -> None:
    record = {"azureactivedirectoryobjectid": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"}
    expr = parse_filter("azureactivedirectoryobjectid eq AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE")
    assert evaluate(expr, record)


def test_datetime_comparison_against_stored_iso_text() -> None:
    record = {"modifiedon": "2024-05-02T00:00:00Z"}
    assert evaluate(parse_filter("modifiedon gt 2024-05-01T00:00:00Z"), record)
    assert not evaluate(parse_filter("modifiedon lt 2024-05-01"), record)


def test_properties_lists_every_read_property() -> None:
    expr = parse_filter("a eq 1 and (not b eq 2 or contains(c,'x'))")
    assert properties(expr) == {"a", "b", "c"}
    assert isinstance(parse_filter("contains(c,'x')"), Function)


def test_keys() -> None:
    assert parse_key("5F0E4E4D-0000-4000-8000-0000000000AA") == "5f0e4e4d-0000-4000-8000-0000000000aa"
    assert parse_key("emailaddress1='a@b.com'") == {"emailaddress1": "a@b.com"}
    assert parse_key("name='x',accountnumber='1'") == {"name": "x", "accountnumber": "1"}
    assert parse_key("name = 'o''b' , n=1") == {"name": "o'b", "n": 1}
    assert parse_key("contactid=5F0E4E4D-0000-4000-8000-0000000000AA") == {
        "contactid": Guid("5f0e4e4d-0000-4000-8000-0000000000aa")
    }
    for bad in ["", "name=", "name='x',", "name='x' name='y'", "name='x',name='y'", "=1", "'x'", "name='x"]:
        with pytest.raises(ODataSyntaxError):
            parse_key(bad)


def test_key_value_text_is_the_inverse_of_the_key_parser() -> None:
    values: list[Value] = ["o'brien", 7, True, None, Guid("5f0e4e4d-0000-4000-8000-0000000000aa")]
    for value in values:
        assert parse_key(f"k={key_value_text(value)}") == {"k": value}


def test_split_resource() -> None:
    assert split_resource("WhoAmI").name == "WhoAmI"
    res = split_resource("contacts(emailaddress1='a)b''/c')/fullname")
    assert (res.name, res.key, res.rest) == ("contacts", "emailaddress1='a)b''/c'", "fullname")
    assert split_resource("systemusers").key is None
    with pytest.raises(ODataSyntaxError):
        split_resource("contacts(emailaddress1='open")
    with pytest.raises(ODataSyntaxError):
        split_resource("contacts(x)junk")


def test_decode_path_is_strict_and_keeps_plus() -> None:
    assert decode_path("a%2Bb+c%2Fd") == "a+b+c/d"
    with pytest.raises(ODataSyntaxError):
        decode_path("%FF")


def test_select() -> None:
    assert parse_select("systemuserid,internalemailaddress") == ["systemuserid", "internalemailaddress"]
    assert parse_select("a, b") == ["a", "b"]
    for bad in ["", "a,,b", "a/b", "*x"]:
        with pytest.raises(ODataSyntaxError):
            parse_select(bad)


TYPES = {
    "systemuserid": "Edm.Guid",
    "isdisabled": "Edm.Boolean",
    "accessmode": "Edm.Int32",
    "internalemailaddress": "Edm.String",
}


def test_type_check_refuses_a_quoted_guid_like_the_odata_parser() -> None:
    guid = "5f0e4e4d-0000-4000-8000-0000000000aa"
    check_types(
        parse_filter(f"systemuserid eq {guid} and accessmode eq 4.0 and isdisabled ne null"), TYPES.get
    )
    with pytest.raises(ODataSyntaxError) as err:
        check_types(parse_filter(f"isdisabled eq false and systemuserid eq '{guid}'"), TYPES.get)
    assert err.value.message == (
        "A binary operator with incompatible types was detected. Found operand types 'Edm.Guid' and "
        "'Edm.String' for operator kind 'Equal'."
    )
    with pytest.raises(
        ODataSyntaxError, match=r"'Edm\.Boolean' and 'Edm\.Int32' for operator kind 'NotEqual'"
    ):
        check_types(parse_filter("not (isdisabled ne 0)"), TYPES.get)
    with pytest.raises(ODataSyntaxError, match="No function signature for the function with name 'contains'"):
        check_types(parse_filter("contains(systemuserid,'5f')"), TYPES.get)
    check_types(parse_filter("unknown eq 'x' or startswith(internalemailaddress,'a')"), TYPES.get)
