"""Fuzz: every value the client puts into a URL reaches the server as exactly that value.

tests/unit/test_odata.py already round-trips the *emulator's* own ``quote_literal`` through
``requests``' ``params=`` encoding.  These properties start from the *client's* side instead — the
URL that ``shared.users``/``shared.dataverse`` really send (captured with ``responses``, after
``requests`` prepared it) — and read it back the way a server does: the query string decoded as a
form (``+`` is a space there, so the client must send ``%2B``), the path percent-decoded once from
the raw request URI, then the emulator's strict OData parser.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import pytest
import responses
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from devstack.dataverse import odata
from shared.dataverse import DataverseClient, encode_query, entity_path, odata_literal
from shared.errors import ActorError, DataverseError
from shared.users import SELECT, UserDirectory
from tests.unit.functions_fakes import FakeTokens
from tests.unit.functions_fakes import settings as app_settings

FUZZ = settings(
    max_examples=300, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
SETTINGS = app_settings()
API_PATH = urlsplit(SETTINGS.api_base).path  # /api/data/v9.2/
USER_ID = "5f2b3c1e-1111-4222-8333-944455556666"

# Surrogates cannot be UTF-8 encoded, so no HTTP client can send them; everything else can.
any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
tricky_text = st.text(st.sampled_from("'\"%+&=#?/\\() ,;:@$ \t\n\x00é日🎉"), max_size=12)
strings = any_text | tricky_text | st.sampled_from(
    ["", "'", "''", "%27", "%2B", "a+b", "o'brien@contoso.com"]
)


def server_args(url: str) -> dict[str, str]:
    """The query arguments a server reads from ``url`` (form decoding: ``+`` is a space)."""
    request = Request(EnvironBuilder(path="/", query_string=urlsplit(url).query).get_environ())
    return dict(request.args)


def server_key(url: str) -> tuple[str, str | dict[str, odata.Value]]:
    """(entity set, key) as the emulator reads them from the raw request path."""
    raw_path = urlsplit(url).path
    assert raw_path.startswith(API_PATH)
    resource = odata.split_resource(odata.decode_path(raw_path[len(API_PATH):]))
    assert resource.key is not None and resource.rest == ""
    return resource.name, odata.parse_key(resource.key)


def prepared_url(url: str) -> str:
    """What ``requests`` really puts on the wire for ``url`` (it re-quotes some characters)."""
    import requests

    prepared = requests.Request("GET", url).prepare()
    assert prepared.url is not None
    return prepared.url


# --- $filter literals ---------------------------------------------------------------------------


@FUZZ
@given(strings)
def test_filter_literal_round_trips_through_the_query_string(value: str) -> None:
    """odata_literal + encode_query, as the client builds any $filter: the parser reads back ``value``."""
    filter_text = f"internalemailaddress eq {odata_literal(value)}"
    url = prepared_url(f"{SETTINGS.api_base}systemusers?" + encode_query({"$filter": filter_text}))
    assert odata.parse_filter(server_args(url)["$filter"]) == odata.Comparison(
        "internalemailaddress", "eq", value
    )


@FUZZ
@given(strings)
def test_email_lookup_sends_exactly_the_address(value: str) -> None:
    """The request UserDirectory.by_email really sends, read by a server: the address, nothing else."""
    client = DataverseClient(SETTINGS, FakeTokens())  # type: ignore[arg-type]
    directory = UserDirectory(client)
    address = value.strip()
    with responses.RequestsMock() as mock:
        if address:
            mock.get(
                re.compile(re.escape(SETTINGS.api_base + "systemusers") + r"\?.*"),
                json={"value": [{"systemuserid": USER_ID, "internalemailaddress": address}]},
            )
            user = directory.by_email(value)
            assert user.systemuserid == USER_ID
            (call,) = mock.calls
            assert call.request.url is not None
            args = server_args(call.request.url)
            assert args == {"$select": SELECT, "$filter": args["$filter"], "$top": "2"}
            assert odata.parse_filter(args["$filter"]) == odata.Comparison(
                "internalemailaddress", "eq", address
            )
        else:
            with pytest.raises(ActorError):
                directory.by_email(value)
    client.close()


# --- alternate-key paths ------------------------------------------------------------------------

key_names = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True) | st.from_regex(
    r"_[a-z][a-z0-9]{0,8}_value", fullmatch=True
)
integers = st.integers(min_value=-(2**63), max_value=2**63 - 1)
floats = st.floats(allow_nan=False, allow_infinity=False)
key_values = strings | integers | floats | st.booleans() | st.none()


@FUZZ
@given(st.dictionaries(key_names, key_values, min_size=1, max_size=3))
def test_alternate_key_path_round_trips(key: dict[str, Any]) -> None:
    """entity_path, as sent by the client (after requests' re-quoting), parsed back from the raw path."""
    url = prepared_url(SETTINGS.api_base + entity_path("contacts", key))
    name, parsed = server_key(url)
    assert name == "contacts"
    assert isinstance(parsed, dict)
    assert list(parsed) == list(key)
    for column, value in key.items():
        got = parsed[column]
        assert got == value and type(got) is type(value), (column, value, got)


@FUZZ
@given(st.uuids())
def test_primary_key_path_round_trips(value: uuid.UUID) -> None:
    for form in (str(value), str(value).upper(), value):
        url = prepared_url(SETTINGS.api_base + entity_path("contacts", form))
        assert server_key(url) == ("contacts", str(value))


@FUZZ
@given(strings)
def test_a_string_key_that_is_not_a_guid_is_refused_not_sent(value: str) -> None:
    """A string key is a primary id: anything but the canonical GUID form is an error before any request."""
    try:
        canonical = str(uuid.UUID(value.strip()))
    except ValueError:
        canonical = None
    if canonical is not None and canonical == value.strip().lower():
        assert entity_path("contacts", value) == f"contacts({canonical})"
    else:
        with pytest.raises(DataverseError) as caught:
            entity_path("contacts", value)
        assert caught.value.code == "dataverse_bad_request" and not caught.value.transient


@FUZZ
@given(st.dictionaries(st.text(max_size=8), key_values, min_size=1, max_size=2))
def test_unsafe_key_names_are_refused_never_spliced_into_the_url(key: Mapping[str, Any]) -> None:
    if all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) for name in key):
        url = prepared_url(SETTINGS.api_base + entity_path("contacts", key))
        assert list(server_key(url)[1]) == list(key)
    else:
        with pytest.raises(DataverseError):
            entity_path("contacts", key)
