"""The authorization policy: strict parsing (errors name the setting and the JSON path), evaluation, the
per-instance Authorizer (blob re-read, single reader), and its two enforcement points."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import contract, policy
from shared.contract import parse_job
from shared.errors import ActorError, ConfigurationError, PolicyViolation, SyncError
from shared.jobs import process_message
from shared.memberships import SYSTEM_ADMINISTRATOR_TEMPLATE, Membership, Role, Team
from shared.policy import Authorizer, actor_problem, default_policy, job_problems, parse_policy
from shared.webhooks import handle_webhook, signature_header
from tests.signing import signed_text
from tests.unit.functions_fakes import JANE, JOHN, FakeMemberships, FakeRuntime, FakeUsers, user
from tests.unit.functions_fakes import settings as base_settings

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

ADMIN_ROLE = Role("00000000-0000-4000-8000-0000000000a1", "System Administrator",
                  SYSTEM_ADMINISTRATOR_TEMPLATE)
SALES_ROLE = Role("00000000-0000-4000-8000-0000000000a2", "Salesperson", None)
SALES_TEAM = Team("00000000-0000-4000-8000-0000000000b1", "Sales EU")

ANYTHING = {"operations": "*", "columns": "*"}
EXAMPLE = {
    "version": 1,
    "sources": {
        "crm": {
            "entities": {
                "contacts": {"operations": ["create", "upsert"],
                             "columns": ["firstname", "lastname", "emailaddress1",
                                         "parentcustomerid_account"],
                             "bind": True},
                "accounts": {"operations": "*", "columns": "*"},
            },
            "actAs": {"users": ["Boss@Contoso.com"], "teams": ["sales eu"], "roles": ["Salesperson"]},
        },
    },
    "default": {"entities": {"leads": {"operations": ["create"], "columns": "*"}},
                "actAs": {"anyPerson": True, "application": True}},
}


def parsed(obj: Any = EXAMPLE) -> policy.Policy:
    return parse_policy(json.dumps(obj))


def a_job(source: str | None = "crm", **fields: Any) -> contract.Job:
    base: dict[str, Any] = {"id": "j-1", "entity": "contacts", "operation": "create",
                            "data": {"firstname": "Ada"}, "actAs": {"email": "jane@contoso.com"}}
    base.update(fields)
    base = {k: v for k, v in base.items() if v is not ...}
    if source is not None:
        base["source"] = source
    return parse_job(base)


def held(*roles: Role, teams: tuple[Team, ...] = ()) -> Membership:
    return Membership(JANE.systemuserid, roles, teams)


# --- parsing -----------------------------------------------------------------------------------------


def test_the_documented_example_parses() -> None:
    rules = parsed()
    crm = rules.for_source("crm")
    assert crm is not None and set(crm.entities) == {"contacts", "accounts"}
    assert crm.entities["contacts"].operations == {"create", "upsert"} and crm.entities["contacts"].bind
    accounts = crm.entities["accounts"]
    assert accounts.columns is None and accounts.operations == set(policy.OPERATIONS)
    assert crm.act_as.users == {"boss@contoso.com"} and crm.act_as.teams == {"sales eu"}
    assert not crm.act_as.any_person and not crm.act_as.application
    assert rules.for_source("other") is rules.default and rules.for_source(None) is rules.default


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda p: p["sources"]["crm"]["entities"].update({"systemusers": ANYTHING}),
         "$.sources.crm.entities.systemusers"),
        (lambda p: p["sources"]["crm"]["entities"].update({"Contacts": ANYTHING}),
         "$.sources.crm.entities.Contacts"),
        (lambda p: p["sources"]["crm"]["entities"]["contacts"].update({"operations": ["create", "merge"]}),
         "$.sources.crm.entities.contacts.operations[1]"),
        (lambda p: p["sources"]["crm"]["entities"]["contacts"].update({"operations": []}),
         "$.sources.crm.entities.contacts.operations"),
        (lambda p: p["sources"]["crm"]["entities"]["contacts"].update({"columns": ["a@odata.bind"]}),
         "$.sources.crm.entities.contacts.columns[0]"),
        (lambda p: p["sources"]["crm"]["entities"]["contacts"].update({"bind": "yes"}),
         "$.sources.crm.entities.contacts.bind"),
        (lambda p: p["sources"]["crm"]["entities"]["contacts"].pop("columns"),
         "$.sources.crm.entities.contacts.columns"),
        (lambda p: p["sources"]["crm"]["entities"]["contacts"].update({"colums": "*"}),
         "$.sources.crm.entities.contacts.colums"),
        (lambda p: p["sources"]["crm"]["actAs"].update({"users": ["not-an-email"]}),
         "$.sources.crm.actAs.users[0]"),
        (lambda p: p["sources"]["crm"]["actAs"].update({"roles": ["System Administrator"]}),
         "$.sources.crm.actAs.roles[0]"),
        (lambda p: p["sources"]["crm"]["actAs"].update({"roles": [SYSTEM_ADMINISTRATOR_TEMPLATE.upper()]}),
         "$.sources.crm.actAs.roles[0]"),
        (lambda p: p["sources"]["crm"]["actAs"].update({"teams": ["a", "A"]}),
         "$.sources.crm.actAs.teams[1]"),
        (lambda p: p["sources"]["crm"].pop("actAs"), "$.sources.crm.actAs"),
        (lambda p: p["sources"].update({"bad source": p["default"]}), '$.sources["bad source"]'),
        (lambda p: p.update({"version": 2}), "$.version"),
        (lambda p: p.update({"extra": 1}), "$.extra"),
        (lambda p: p.update({"default": []}), "$.default"),
    ],
)
def test_a_policy_problem_names_the_setting_and_the_json_path(change: Any, path: str) -> None:
    broken = json.loads(json.dumps(EXAMPLE))
    change(broken)
    with pytest.raises(ConfigurationError) as info:
        parse_policy(json.dumps(broken), setting="AUTHORIZATION_POLICY_BLOB")
    assert info.value.setting == "AUTHORIZATION_POLICY_BLOB"
    assert info.value.message.startswith("AUTHORIZATION_POLICY_BLOB: ")
    assert f"{path}:" in info.value.message, info.value.message


@pytest.mark.parametrize("text", ["", "{", "[]", "null", '{"sources": {}, "sources": {}}', "{}"])
def test_not_a_policy_is_a_configuration_error(text: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_policy(text)
    assert info.value.setting == "AUTHORIZATION_POLICY"


def test_every_problem_is_reported_at_once() -> None:
    broken = {"sources": {"crm": {"entities": {"roles": {"operations": "*", "columns": "*"},
                                               "solutions": {"operations": "*", "columns": "*"}},
                                  "actAs": {"anyPerson": 1}}}}
    with pytest.raises(ConfigurationError) as info:
        parse_policy(json.dumps(broken))
    for path in ("entities.roles", "entities.solutions", "actAs.anyPerson"):
        assert path in info.value.message


@FUZZ
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["sources", "default", "crm", "entities", "contacts", "systemusers",
                                         "operations", "columns", "bind", "actAs", "users", "anyPerson"]),
                        inner, max_size=4), max_leaves=20))
def test_any_json_is_a_policy_or_a_configuration_error(value: object) -> None:
    try:
        rules = parse_policy(json.dumps(value))
    except ConfigurationError:
        return
    for rule in [*rules.sources.values(), *([rules.default] if rules.default else [])]:
        assert not set(rule.entities) & policy.DENIED_ENTITY_SETS


@FUZZ
@given(st.sampled_from(sorted(policy.DENIED_ENTITY_SETS)), st.sampled_from(["sources", "default"]))
def test_no_policy_can_allow_a_system_table(entity: str, where: str) -> None:
    rule = {"entities": {entity: {"operations": "*", "columns": "*"}}, "actAs": {"anyPerson": True}}
    text = json.dumps({"sources": {"crm": rule}} if where == "sources" else {"default": rule})
    with pytest.raises(ConfigurationError, match=entity):
        parse_policy(text)


def test_the_default_policy_comes_from_allowed_entity_sets() -> None:
    rules = default_policy("contacts, accounts")
    assert rules.default is not None and set(rules.default.entities) == {"contacts", "accounts"}
    assert rules.default.act_as.any_person and rules.default.act_as.application
    for bad in ("", "contacts,systemusers", "contacts,Accounts", "contacts;accounts"):
        with pytest.raises(ConfigurationError) as info:
            default_policy(bad)
        assert info.value.setting == "ALLOWED_ENTITY_SETS"


# --- evaluation ---------------------------------------------------------------------------------------


def fields_of(problems: list[tuple[str, str]]) -> list[str]:
    return [path for path, _ in problems]


def test_job_problems_name_the_refused_field() -> None:
    rules = parsed()
    assert job_problems(rules, a_job(), "crm") == []
    system = a_job(entity="systemusers", operation="update", key=JANE.systemuserid)
    assert fields_of(job_problems(rules, system, "crm")) == ["entity"]
    assert fields_of(job_problems(rules, a_job(entity="leads"), "crm")) == ["entity"]
    update = a_job(operation="update", key=JANE.systemuserid)
    assert fields_of(job_problems(rules, update, "crm")) == ["operation"]
    assert fields_of(job_problems(rules, a_job(data={"firstname": "A", "description": "x"}), "crm")) == [
        "data.description"]
    bound = {"parentcustomerid_account@odata.bind": "/accounts(00000000-0000-4000-8000-000000000001)"}
    assert job_problems(rules, a_job(data=bound), "crm") == []
    assert fields_of(job_problems(rules, a_job(data={"ownerid@odata.bind": "/systemusers(x)"}), "crm")) == [
        "data.ownerid@odata.bind"]
    assert fields_of(job_problems(rules, a_job(operation="upsert", key={"telephone1": "1"}), "crm")) == [
        "key.telephone1"]
    assert fields_of(job_problems(rules, a_job(actAs=...), "crm")) == ["actAs"]
    assert job_problems(rules, a_job(entity="leads", actAs=...), "erp") == []  # the default
    no_default = parse_policy(json.dumps({"sources": EXAMPLE["sources"]}))
    assert fields_of(job_problems(no_default, a_job(), "erp")) == ["source"]


@pytest.mark.parametrize("value", [{"name": "Contoso"}, [{"subject": "x"}], []])
def test_a_deep_insert_is_refused_whatever_the_policy(value: object) -> None:
    rules = parse_policy(json.dumps({"default": {"entities": {"contacts": {**ANYTHING, "bind": True}},
                                                 "actAs": {"anyPerson": True}}}))
    deep = a_job(data={"firstname": "A", "parentcustomerid_account": value})
    assert fields_of(job_problems(rules, deep, "crm")) == ["data.parentcustomerid_account"]


def test_binds_are_refused_unless_the_entity_allows_them() -> None:
    rules = parse_policy(json.dumps({"default": {"entities": {"contacts": ANYTHING},
                                                 "actAs": {"anyPerson": True}}}))
    bound = a_job(data={"parentcustomerid_account@odata.bind": "/accounts(1)"})
    assert fields_of(job_problems(rules, bound, "crm")) == ["data.parentcustomerid_account@odata.bind"]
    assert fields_of(job_problems(default_policy("contacts"), bound, "crm")) == [
        "data.parentcustomerid_account@odata.bind"]


column_names = st.from_regex(r"[a-z][a-z0-9_]{0,6}(@odata\.bind)?", fullmatch=True)


@FUZZ
@given(st.sets(st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True), max_size=5),
       st.sets(column_names, min_size=1, max_size=6), st.booleans())
def test_a_column_is_refused_exactly_when_the_policy_does_not_allow_it(
    allowed: set[str], written: set[str], bind: bool
) -> None:
    rules = parse_policy(json.dumps({"default": {
        "entities": {"contacts": {"operations": "*", "columns": sorted(allowed), "bind": bind}},
        "actAs": {"anyPerson": True}}}))
    problems = job_problems(rules, a_job(data=dict.fromkeys(written, 1)), "crm")
    refused = {path.removeprefix("data.") for path in fields_of(problems)}
    expected = {name for name in written
                if name.partition("@")[0] not in allowed or (name.endswith("@odata.bind") and not bind)}
    assert refused == expected


def test_actor_rules() -> None:
    rules = parsed()
    asked: list[str] = []

    def membership(result: Membership) -> Any:
        return lambda: asked.append("asked") or result

    boss = dataclasses.replace(JANE, email="boss@contoso.com")
    # named one by one: allowed even as an administrator, without asking Dataverse
    assert actor_problem(rules, "crm", boss, membership(held(ADMIN_ROLE))) is None and asked == []
    assert actor_problem(rules, "crm", JANE, membership(held(SALES_ROLE))) is None
    assert actor_problem(rules, "crm", JANE, membership(held(teams=(SALES_TEAM,)))) is None
    refused = actor_problem(rules, "crm", JANE, membership(held()))
    assert refused is not None and "not a member" in refused
    # a holder of an allowed role who is also an administrator is refused
    admin = actor_problem(rules, "crm", JANE, membership(held(SALES_ROLE, ADMIN_ROLE)))
    assert admin is not None and "System Administrator" in admin
    # through a team's role too
    via_team = dataclasses.replace(ADMIN_ROLE, via_team=SALES_TEAM.teamid)
    assert actor_problem(rules, None, JANE, membership(held(via_team))) is not None
    assert actor_problem(rules, None, JANE, membership(held(SALES_ROLE))) is None  # default: anyPerson


def test_users_only_policy_refuses_without_asking_dataverse() -> None:
    rules = parse_policy(json.dumps({"default": {"entities": {"contacts": ANYTHING},
                                                 "actAs": {"users": [JANE.systemuserid.upper()]}}}))

    def never() -> Membership:
        raise AssertionError("membership asked")

    assert actor_problem(rules, "crm", JANE, never) is None
    assert actor_problem(rules, "crm", JOHN, never) is not None


@pytest.mark.parametrize("entry", ["Salesperson", "SALESPERSON", SALES_ROLE.roleid.upper()])
def test_a_role_is_matched_by_name_or_id(entry: str) -> None:
    rules = parse_policy(json.dumps({"default": {"entities": {"contacts": ANYTHING},
                                                 "actAs": {"roles": [entry]}}}))
    assert actor_problem(rules, "crm", JANE, lambda: held(SALES_ROLE)) is None
    assert actor_problem(rules, "crm", JANE, lambda: held()) is not None


# --- the Authorizer ---------------------------------------------------------------------------------


class FakeBlob:
    def __init__(self, store: FakeBlobs, name: str) -> None:
        self.store, self.name = store, name

    def download_blob(self) -> Any:
        self.store.reads += 1
        if isinstance(self.store.content, BaseException):
            raise self.store.content
        return type("D", (), {"readall": lambda _: self.store.content})()


class FakeBlobs:
    def __init__(self, content: bytes | BaseException) -> None:
        self.content = content
        self.reads = 0
        self.paths: list[tuple[str, str]] = []

    def container(self, name: str) -> Any:
        store = self

        class Container:
            def get_blob_client(self, blob: str) -> FakeBlob:
                store.paths.append((name, blob))
                return FakeBlob(store, blob)

        return Container()


def authorizer(blobs: FakeBlobs | None = None, clock: Any = time.monotonic, **settings: str) -> Authorizer:
    values = dataclasses.replace(base_settings(), **settings)
    return Authorizer(values, FakeUsers(), FakeMemberships(), blobs=blobs, clock=clock)  # type: ignore[arg-type]


def test_the_blob_policy_is_re_read_after_its_ttl() -> None:
    now = [0.0]
    blobs = FakeBlobs(json.dumps(EXAMPLE).encode())
    auth = authorizer(blobs, lambda: now[0], authorization_policy_blob="config/policy.json")
    assert auth.policy().for_source("crm") is not None and blobs.paths == [("config", "policy.json")]
    auth.check_job(a_job())
    now[0] = policy.POLICY_TTL_SECONDS - 1
    auth.policy()
    assert blobs.reads == 1
    blobs.content = json.dumps({"default": EXAMPLE["default"]}).encode()
    now[0] = policy.POLICY_TTL_SECONDS + 1
    with pytest.raises(PolicyViolation) as info:
        auth.check_job(a_job())  # crm now falls to the default, which has no contacts
    assert blobs.reads == 2 and info.value.code == "forbidden_by_policy"
    assert info.value.details[0]["field"] == "entity"


def test_an_unreadable_blob_keeps_the_last_policy_but_a_missing_or_broken_one_fails_closed() -> None:
    from azure.core.exceptions import ResourceNotFoundError, ServiceRequestError

    now = [0.0]
    blobs = FakeBlobs(json.dumps(EXAMPLE).encode())
    auth = authorizer(blobs, lambda: now[0], authorization_policy_blob="config/policy.json")
    first = auth.policy()
    blobs.content = ServiceRequestError("connection reset")
    now[0] = 1000.0
    assert auth.policy() is first
    blobs.content = b'{"sources": {"crm": {}}}'
    now[0] = 2000.0
    with pytest.raises(ConfigurationError, match=r"AUTHORIZATION_POLICY_BLOB: .*\$\.sources\.crm\.entities"):
        auth.policy()
    blobs.content = ResourceNotFoundError("gone")
    with pytest.raises(ConfigurationError, match="does not exist"):
        auth.policy()
    cold = authorizer(FakeBlobs(ServiceRequestError("down")), authorization_policy_blob="config/policy.json")
    with pytest.raises(SyncError) as info:
        cold.policy()
    assert info.value.transient and info.value.code == "policy_unavailable"


@pytest.mark.parametrize(
    ("values", "setting"),
    [
        ({"authorization_policy": "{}", "authorization_policy_blob": "config/p.json"},
         "AUTHORIZATION_POLICY"),
        ({"authorization_policy_blob": "policy.json"}, "AUTHORIZATION_POLICY_BLOB"),
        ({"authorization_policy_blob": "UPPER/policy.json"}, "AUTHORIZATION_POLICY_BLOB"),
        ({"authorization_policy": "[1]"}, "AUTHORIZATION_POLICY"),
        ({"allowed_entity_sets": "contacts,organizations"}, "ALLOWED_ENTITY_SETS"),
    ],
)
def test_settings_problems_name_the_setting(values: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        authorizer(FakeBlobs(b"{}"), **values).policy()
    assert info.value.setting == setting


def test_an_inline_policy_is_read_once() -> None:
    auth = authorizer(authorization_policy=json.dumps(EXAMPLE))
    for _ in range(3):
        auth.check_job(a_job())
    assert auth.loads == 1


def test_check_actor_refuses_application_users_with_their_own_code() -> None:
    auth = authorizer()
    app = dataclasses.replace(JANE, application_id="00000000-0000-4000-8000-00000000c11e")
    with pytest.raises(ActorError) as info:
        auth.check_actor(a_job(), app)
    assert info.value.code == "actor_application_user"


# --- the two enforcement points ---------------------------------------------------------------------------


ADMIN = user("admin@contoso.com")


def admin_runtime(**settings: str) -> FakeRuntime:
    values = dataclasses.replace(base_settings(), **settings)
    return FakeRuntime(settings=values, users=FakeUsers([JANE, JOHN, ADMIN]),
                       memberships=FakeMemberships({ADMIN.systemuserid: Membership(ADMIN.systemuserid,
                                                                                    (ADMIN_ROLE,), ())}))


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"actAs": {"email": "admin@contoso.com"}}, "actAs"),
        ({"entity": "systemusers", "operation": "update", "key": JANE.systemuserid,
          "data": {"isdisabled": False}}, "entity"),
        ({"entity": "opportunities"}, "entity"),
        ({"data": {"ownerid@odata.bind": f"/systemusers({ADMIN.systemuserid})"}}, "data.ownerid@odata.bind"),
    ],
)
def test_sync_job_dead_letters_before_any_request(fields: dict[str, Any], field: str) -> None:
    runtime = admin_runtime()
    body = signed_text({**a_job().raw, **fields})  # on the queue, as the webhook sealed it
    outcome = process_message(body, lambda: runtime)  # type: ignore[arg-type, return-value]
    assert outcome.dead_letter is not None and outcome.dead_letter["reason"] == "forbidden_by_policy"
    assert runtime.dataverse.calls == [] and runtime.dataverse.requests == []
    assert runtime.attribution.verified == []
    assert field in outcome.dead_letter["detail"]


def test_sync_job_writes_as_an_administrator_the_policy_names() -> None:
    rules = {"default": {"entities": {"contacts": {"operations": "*", "columns": "*"}},
                         "actAs": {"users": ["admin@contoso.com"]}}}
    runtime = admin_runtime(authorization_policy=json.dumps(rules))
    body = signed_text({**a_job().raw, "actAs": {"email": "admin@contoso.com"}})
    outcome = process_message(body, lambda: runtime)  # type: ignore[arg-type, return-value]
    assert outcome.dead_letter is None and runtime.attribution.verified == [ADMIN.systemuserid]


KEY = "webhook-KEY-value-456"


def post(runtime: FakeRuntime, jobs_: list[dict[str, Any]], source: str = "crm") -> Any:
    body = json.dumps({"jobs": jobs_}).encode()
    headers = {"Content-Type": "application/json",
               "X-Signature": signature_header(KEY.encode(), body, int(time.time()), source=source)}
    return handle_webhook(source, headers, body, lambda: KEY, authorize=runtime.policy.check_batch)


def test_the_webhook_refuses_the_whole_batch_naming_each_field() -> None:
    runtime = admin_runtime()
    good = {k: v for k, v in a_job(source=None).raw.items()}
    result = post(runtime, [good, {**good, "id": "j-2", "actAs": {"email": "admin@contoso.com"}},
                            {**good, "id": "j-3", "entity": "teams"},
                            {**good, "id": "j-4", "actAs": {"email": "nobody@contoso.com"}}])
    assert result.status == 403 and result.messages == []
    assert result.body["error"]["code"] == "forbidden_by_policy"
    # nobody@: not found is sync_job's to dead-letter (actor_not_found), as before
    assert [d["field"] for d in result.body["error"]["details"]] == ["jobs[1].actAs", "jobs[2].entity"]
    assert post(runtime, [good]).status == 202


def test_the_webhook_looks_each_distinct_actor_up_once_and_reports_in_batch_order() -> None:
    people = [user(f"p{n}@contoso.com") for n in range(12)]
    admins = {people[2].systemuserid, people[11].systemuserid}
    users = FakeUsers(people)
    memberships = FakeMemberships({uid: Membership(uid, (ADMIN_ROLE,), ()) for uid in admins})
    runtime = FakeRuntime(users=users, memberships=memberships)
    batch = [a_job(source=None, id=f"j-{n}", actAs={"email": f"p{n % 12}@contoso.com"}) for n in range(24)]
    refused = runtime.policy.check_batch("crm", [(f"jobs[{n}]", job) for n, job in enumerate(batch)])
    assert [d["field"] for d in refused] == [f"jobs[{n}].actAs" for n in (2, 11, 14, 23)]
    assert len(users.resolved) == 12 and memberships.queries == 12


# --- bulk jobs: every record is checked --------------------------------------------------------------


def bulk(source: str | None = "crm", **fields: Any) -> contract.Job:
    base: dict[str, Any] = {"id": "b-1", "entity": "contacts", "operation": "upsert",
                            "records": [{"key": {"emailaddress1": "a@x.com"}, "data": {"firstname": "A"}},
                                        {"key": {"emailaddress1": "b@x.com"}, "data": {"description": "B"}}],
                            "actAs": {"email": "jane@contoso.com"}}
    base.update(fields)
    if source is not None:
        base["source"] = source
    return parse_job(base)


def test_every_record_of_a_bulk_job_is_checked() -> None:
    rules = parsed()
    assert fields_of(job_problems(rules, bulk(), "crm")) == ["records[1].data.description"]
    assert fields_of(job_problems(rules, bulk(entity="systemusers"), "crm")) == ["entity"]
    claim = parse_job(
        {"id": "b-2", "entity": "contacts", "operation": "upsert", "recordsBlob": "bulk-records/b.json",
         "actAs": {"email": "jane@contoso.com"}, "source": "crm"})
    assert job_problems(rules, claim, "crm") == []  # the webhook cannot see a claim-check's records
    read = [{"key": {"emailaddress1": "a@x.com"}, "data": {"firstname": "A", "ownerid@odata.bind": "/x(1)"}}]
    assert fields_of(job_problems(rules, claim, "crm", read)) == ["recordsBlob[0].data.ownerid@odata.bind"]


def test_the_webhook_refuses_a_bulk_record_the_policy_forbids() -> None:
    runtime = admin_runtime(authorization_policy=json.dumps(EXAMPLE))
    result = post(runtime, [{k: v for k, v in bulk(source=None).raw.items()}])
    assert result.status == 403
    assert [d["field"] for d in result.body["error"]["details"]] == ["jobs[0].records[1].data.description"]
