"""The emulator's ``$expand`` of a user's roles and teams: what the app sends parses; anything else is
Dataverse's 400 for a wrong name or the emulator's 501 for valid OData it does not do — never a crash."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devstack.dataverse.security import Expand, ExpandError, Security, context_columns, parse_expand
from shared.memberships import EXPAND, SYSTEM_ADMINISTRATOR_TEMPLATE, parse_membership


def test_the_apps_expand_parses_and_answers_in_dataverse_shape() -> None:
    items = parse_expand(EXPAND)
    assert [i.name for i in items] == ["systemuserroles_association", "teammembership_association"]
    assert items[1].expand == (Expand("teamroles_association", ("name", "roleid", "_roletemplateid_value")),)
    ids = iter(range(100))
    security = Security("bu", lambda *parts: f"00000000-0000-4000-8000-{next(ids):012d}")
    admin = next(r["roleid"] for r in security.roles_wire() if r["name"] == "System Administrator")
    team = security.add_team("Admins", ["u1"], [admin])
    answer = security.expand("systemuser", "u1", items)
    assert answer["systemuserroles_association"] == []
    (row,) = answer["teammembership_association"]
    assert row["teamid"] == team["teamid"] and row["teamroles_association"][0]["roleid"] == admin
    membership = parse_membership("u1", answer)
    assert membership.is_system_administrator and membership.roles[0].via_team == team["teamid"]
    assert membership.roles[0].template_id == SYSTEM_ADMINISTRATOR_TEMPLATE
    assert context_columns(["systemuserid"], items).startswith(
        "(systemuserid,systemuserroles_association(name,")


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("roles", 400),
        ("systemuserroles_association($select=nope)", 400),
        ("systemuserroles_association($top=1)", 501),
        ("systemuserroles_association($filter=name eq 'x')", 501),
        ("teammembership_association($expand=systemuserroles_association)", 400),
        ("systemuserroles_association(", 400),
        ("systemuserroles_association,", 400),
        ("", 400),
    ],
)
def test_a_wrong_expand_is_refused(text: str, status: int) -> None:
    with pytest.raises(ExpandError) as info:
        parse_expand(text)
    assert info.value.status == status


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.text(alphabet="$()=,;_ abcdefghijklmnopqrstuvwxyz", max_size=60) | st.text(max_size=30))
def test_any_text_parses_or_is_refused_with_a_status(text: str) -> None:
    try:
        parse_expand(text)
    except ExpandError as error:
        assert error.status in (400, 501)
