"""Deadlines: a job never waits past JOB_DEADLINE_SECONDS, an HTTP trigger not past HTTP_MAX_WAIT_SECONDS."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
import responses

import function_app
from shared import deadline
from shared.dataverse import DataverseClient
from shared.deadline import DeadlineExceeded
from shared.errors import ConfigurationError, DataverseError
from shared.jobs import is_job_fault, process_message
from shared.settings import (
    FUNCTION_TIMEOUT_OVERRIDE,
    HOST_JSON,
    Settings,
    function_timeout_seconds,
    parse_timespan,
)
from shared.singleflight import SingleFlight
from tests.signing import signed_text
from tests.unit.functions_fakes import FakeRuntime
from tests.unit.test_dataverse import API, SETTINGS, Clock, FakeTokens, error_body

ENV = {
    "DATAVERSE_URL": "https://org.crm.dynamics.com",
    "DATAVERSE_TENANT_ID": "11111111-2222-3333-4444-555555555555",
    "DATAVERSE_CLIENT_ID": "66666666-7777-8888-9999-000000000000",
    "KEY_VAULT_URL": "https://kv.vault.azure.net",
}


@pytest.fixture
def mock() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as m:
        yield m


def throttled(mock: responses.RequestsMock, retry_after: str, times: int = 1) -> None:
    for _ in range(times):
        mock.get(f"{API}WhoAmI", status=429, headers={"Retry-After": retry_after},
                 json=error_body("0x80072322", "Number of requests exceeded the limit of 6000"))
    mock.get(f"{API}WhoAmI", json={"UserId": "x"})


Scope = ContextManager[deadline.Deadline]


def job_scope(seconds: float, clock: Callable[[], float] = time.monotonic) -> Scope:
    return deadline.within(seconds, kind=deadline.JOB, setting="JOB_DEADLINE_SECONDS", clock=clock)


def http_scope(seconds: float, clock: Callable[[], float] = time.monotonic) -> Scope:
    return deadline.within(seconds, kind=deadline.HTTP, setting="HTTP_MAX_WAIT_SECONDS", clock=clock)


def client_on(clock: Clock) -> DataverseClient:
    return DataverseClient(SETTINGS, FakeTokens(), sleep=clock.sleep, clock=clock,  # type: ignore[arg-type]
                           jitter=lambda: 1.0)


# --- the default stays inside host.json's functionTimeout -----------------------------------------


def test_the_default_job_deadline_leaves_one_request_timeout_before_host_json_function_timeout() -> None:
    limit = parse_timespan(json.loads(HOST_JSON.read_text())["functionTimeout"])
    assert limit is not None
    settings = Settings.from_env(ENV)
    assert settings.job_deadline_seconds == 480
    assert settings.job_deadline_seconds + settings.timeout_seconds < limit
    assert function_timeout_seconds({}) == limit


def test_a_job_deadline_that_would_outlive_the_function_timeout_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env({**ENV, "JOB_DEADLINE_SECONDS": "590"})  # + 30 s request timeout > 600
    assert raised.value.setting == "JOB_DEADLINE_SECONDS"
    # the host's own app-setting override of host.json counts too
    with pytest.raises(ConfigurationError):
        Settings.from_env({**ENV, "JOB_DEADLINE_SECONDS": "60", FUNCTION_TIMEOUT_OVERRIDE: "00:01:00"})
    assert Settings.from_env({**ENV, "JOB_DEADLINE_SECONDS": "5",
                              FUNCTION_TIMEOUT_OVERRIDE: "00:01:00"}).job_deadline_seconds == 5
    # unbounded, or no host.json at all: nothing to check against
    assert function_timeout_seconds({FUNCTION_TIMEOUT_OVERRIDE: "-1"}) is None
    assert function_timeout_seconds({}, tmp_path / "host.json") is None


@pytest.mark.parametrize("name", ["JOB_DEADLINE_SECONDS", "HTTP_MAX_WAIT_SECONDS"])
@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_bad_values_name_the_setting(name: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env({**ENV, name: value})
    assert raised.value.setting == name


def test_timespans() -> None:
    assert parse_timespan("00:10:00") == 600
    assert parse_timespan("1.02:00:30.5") == 86400 + 7200 + 30.5
    assert parse_timespan("-1") is None
    assert parse_timespan("ten minutes") is None


# --- the wait in DataverseClient.request --------------------------------------------------------


def test_a_retry_after_that_ends_before_the_job_deadline_is_waited(mock: responses.RequestsMock) -> None:
    clock = Clock()
    throttled(mock, "7")
    with job_scope(10, clock):
        assert client_on(clock).whoami() == {"UserId": "x"}
    assert clock.sleeps == [7.0]


def test_a_retry_after_past_the_job_deadline_is_not_waited_and_is_transient(
    mock: responses.RequestsMock,
) -> None:
    clock = Clock()
    throttled(mock, "30")
    with job_scope(10, clock), pytest.raises(DeadlineExceeded) as raised:
        client_on(clock).whoami()
    assert clock.sleeps == []  # fail fast: the message goes back to the queue now
    assert len(mock.calls) == 1
    error = raised.value
    assert (error.code, error.transient, error.retry_after) == ("job_deadline_exceeded", True, 30.0)
    assert not is_job_fault(error)
    assert isinstance(error.__cause__, DataverseError) and error.__cause__.code == "dataverse_throttled"
    assert "JOB_DEADLINE_SECONDS=10" in error.message


def test_waits_add_up_against_the_deadline(mock: responses.RequestsMock) -> None:
    clock = Clock()
    throttled(mock, "4", times=3)
    with job_scope(10, clock), pytest.raises(DeadlineExceeded):
        client_on(clock).whoami()
    assert clock.sleeps == [4.0, 4.0]  # a third wait would end at 12 s > 10 s


def test_no_request_starts_after_a_job_deadline(mock: responses.RequestsMock) -> None:
    clock = Clock()
    throttled(mock, "1", times=0)
    with job_scope(10, clock):
        clock.now += 10
        with pytest.raises(DeadlineExceeded):
            client_on(clock).whoami()
    assert len(mock.calls) == 0


def test_an_http_wait_limit_raises_dataverses_own_error(mock: responses.RequestsMock) -> None:
    clock = Clock()
    throttled(mock, "42")
    with http_scope(5, clock), pytest.raises(DataverseError) as raised:
        client_on(clock).whoami()
    assert (raised.value.code, raised.value.retry_after) == ("dataverse_throttled", 42.0)
    assert clock.sleeps == []


def test_without_a_deadline_the_client_waits_as_before(mock: responses.RequestsMock) -> None:
    clock = Clock()
    throttled(mock, "30")
    assert client_on(clock).whoami() == {"UserId": "x"}
    assert clock.sleeps == [30.0]


def test_an_inner_scope_never_extends_an_outer_deadline() -> None:
    clock = Clock()
    with job_scope(10, clock) as outer:
        with http_scope(60, clock) as inner:
            assert inner is outer
        assert deadline.current() is outer
    assert deadline.current() is None


def test_a_pool_thread_s_next_invocation_does_not_see_the_previous_deadline() -> None:
    """The Functions worker reuses its pool threads: one invocation's deadline must end with it.

    (A new thread never inherits context variables, so only a reused thread shows a leak.)
    """
    seen: list[deadline.Deadline | None] = []

    def with_a_deadline() -> None:
        with job_scope(10):
            seen.append(deadline.current())

    def without() -> None:
        seen.append(deadline.current())

    with ThreadPoolExecutor(max_workers=1) as pool:  # one thread: the second call reuses it
        threads = [pool.submit(lambda: (with_a_deadline(), threading.get_ident())[1]).result(),
                   pool.submit(lambda: (without(), threading.get_ident())[1]).result()]
    assert threads[0] == threads[1]
    assert seen[0] is not None and seen[1] is None


# --- single-flight followers ---------------------------------------------------------------------


def test_a_follower_stops_waiting_for_the_leader_at_its_own_deadline() -> None:
    flight: SingleFlight[str] = SingleFlight()
    release = threading.Event()
    leading = threading.Event()

    def slow() -> str:
        leading.set()
        release.wait(30)
        return "value"

    leader = threading.Thread(target=lambda: flight.do("k", slow))
    leader.start()
    assert leading.wait(10)
    try:
        with http_scope(0.05), pytest.raises(DeadlineExceeded) as raised:
            flight.do("k", lambda: "never called")
        assert (raised.value.code, raised.value.transient) == ("wait_limit_exceeded", True)
        with job_scope(0.05), pytest.raises(DeadlineExceeded) as raised:
            flight.do("k", lambda: "never called")
        assert raised.value.code == "job_deadline_exceeded"
    finally:
        release.set()
        leader.join()


# --- process_message: the job's scope -----------------------------------------------------------


class DeadlineSpy:
    """A Dataverse fake that records the deadline in force during the write, then is throttled."""

    def __init__(self) -> None:
        self.seen: list[deadline.Deadline | None] = []

    def __getattr__(self, name: str) -> Any:
        def write(*args: Any, **kwargs: Any) -> Any:
            current = deadline.current()
            self.seen.append(current)
            assert current is not None
            current.check_wait(10_000, "PATCH contacts answered 429")
            raise AssertionError("not reached")

        return write


def test_process_message_runs_the_job_under_job_deadline_seconds() -> None:
    spy = DeadlineSpy()
    runtime = FakeRuntime(dataverse=spy)
    body = signed_text({"id": "dl-1", "entity": "contacts", "operation": "upsert",
                        "key": {"emailaddress1": "a@example.com"}, "data": {"firstname": "A"}})
    with pytest.raises(DeadlineExceeded) as raised:
        process_message(body, lambda: runtime)  # type: ignore[arg-type, return-value]
    assert raised.value.code == "job_deadline_exceeded"
    (seen,) = spy.seen
    assert seen is not None and seen.kind == deadline.JOB
    assert seen.seconds == runtime.settings.job_deadline_seconds
    assert deadline.current() is None  # reset for the pool thread's next invocation


# --- HTTP triggers: 503 with Dataverse's Retry-After ---------------------------------------------


class ThrottledUsers:
    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        self.seen: list[deadline.Deadline | None] = []

    def by_email(self, email: str, *, correlation_id: str | None = None) -> Any:
        current = deadline.current()
        self.seen.append(current)
        error = DataverseError("GET systemusers answered 429", status=429, dataverse_code="0x80072322",
                               retry_after=self.retry_after)
        assert current is not None
        current.check_wait(self.retry_after, "GET systemusers answered 429", error)
        raise AssertionError("the wait fits: not what this test is about")


def test_users_answers_503_with_the_retry_after_dataverse_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    users = ThrottledUsers(41.2)
    runtime = FakeRuntime(users=users)
    monkeypatch.setattr(function_app, "_runtime", lambda: runtime)
    monkeypatch.setenv("HTTP_MAX_WAIT_SECONDS", "3")
    request = func.HttpRequest("GET", "/api/users", params={"email": "jane@contoso.com"}, body=b"")
    response = function_app.lookup_user(request)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "42"  # rounded up
    assert json.loads(response.get_body())["error"]["code"] == "dataverse_throttled"
    (seen,) = users.seen
    assert seen is not None and (seen.kind, seen.seconds) == (deadline.HTTP, 3.0)


def test_a_bad_http_max_wait_is_a_500_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_MAX_WAIT_SECONDS", "soon")
    request = func.HttpRequest("GET", "/api/users", params={"email": "jane@contoso.com"}, body=b"")
    response = function_app.lookup_user(request)
    assert response.status_code == 500
    assert "HTTP_MAX_WAIT_SECONDS" in json.loads(response.get_body())["error"]["message"]


def test_diagnostics_answers_503_with_retry_after_when_a_step_is_throttled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[deadline.Deadline | None] = []

    def diagnostics(**_: Any) -> dict[str, Any]:
        seen.append(deadline.current())
        return {"ok": False, "steps": [], "retryAfter": 17}

    monkeypatch.setattr(function_app, "run_diagnostics", diagnostics)
    monkeypatch.delenv("HTTP_MAX_WAIT_SECONDS", raising=False)
    response = function_app.diagnostics(func.HttpRequest("GET", "/api/diagnostics", body=b""))
    assert (response.status_code, response.headers["Retry-After"]) == (503, "17")
    assert seen[0] is not None and seen[0].seconds == 5.0


def test_run_diagnostics_reports_the_retry_after_of_a_throttled_step() -> None:
    from tests.unit.test_diagnostics import diagnose, healthy_runtime

    runtime = healthy_runtime()

    def throttled_whoami(**_: Any) -> Any:
        raise DataverseError("GET WhoAmI answered 429", status=429, dataverse_code="0x80072321",
                             retry_after=12.2)

    runtime.dataverse.whoami = throttled_whoami
    report = diagnose(runtime)
    assert report["ok"] is False and report["retryAfter"] == 13
    assert "retryAfter" not in diagnose(healthy_runtime())


def test_budget_is_cut_to_what_the_deadline_leaves() -> None:
    clock = Clock()
    assert deadline.budget(300) == 300
    with job_scope(10, clock):
        clock.now += 4
        assert deadline.budget(300) == 6
        assert deadline.budget(2) == 2
        clock.now += 20
        assert deadline.budget(300) == 0



class ThrottledLookup:
    """A user lookup answered 429 with Retry-After 30 s: what DataverseClient does is ``check_wait(30)``.

    The leader (the first caller) stays inside the call until a follower is waiting for it.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        self.leading = threading.Event()
        self.follower_waiting = threading.Event()
        real = deadline.wait_event

        def signalling(wait: Callable[[float | None], bool], what: str) -> None:
            self.follower_waiting.set()
            real(wait, what)

        monkeypatch.setattr("shared.singleflight.wait_event", signalling)

    def __call__(self) -> str:
        current = deadline.current()
        assert current is not None
        self.calls.append(current.kind)
        if len(self.calls) == 1:
            self.leading.set()
            assert self.follower_waiting.wait(10)
        current.check_wait(30, "GET systemusers answered 429", DataverseError(
            "throttled", code="dataverse_throttled", transient=True, retry_after=30))
        return "found"

    def lead(self, flight: SingleFlight[str], scope: Callable[[], Scope]) -> list[object]:
        """Start the leader in its own thread; its outcome lands in the returned list."""
        outcome: list[object] = []

        def run() -> None:
            with scope():
                try:
                    outcome.append(flight.do("user", self))
                except Exception as exc:  # the leader's own outcome, checked by the test
                    outcome.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        self.thread = thread
        assert self.leading.wait(10)
        return outcome


def test_a_follower_with_time_left_does_not_inherit_the_leaders_deadline_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The leader (an HTTP request, 5 s) will not wait out a 30 s Retry-After; a job following it (600 s)
    makes the call itself instead of failing with the leader's throttle error."""
    flight: SingleFlight[str] = SingleFlight()
    lookup = ThrottledLookup(monkeypatch)
    led = lookup.lead(flight, lambda: http_scope(5))
    try:
        with job_scope(600):
            assert flight.do("user", lookup) == "found"
    finally:
        lookup.thread.join()
    assert isinstance(led[0], DataverseError) and led[0].code == "dataverse_throttled"  # the leader's own
    assert lookup.calls == [deadline.HTTP, deadline.JOB]  # the follower made its own call


def test_a_follower_with_no_more_time_fails_by_its_own_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    flight: SingleFlight[str] = SingleFlight()
    lookup = ThrottledLookup(monkeypatch)
    led = lookup.lead(flight, lambda: http_scope(5))
    try:
        with http_scope(10), pytest.raises(DataverseError) as raised:  # 10 s < the 30 s Retry-After
            flight.do("user", lookup)
    finally:
        lookup.thread.join()
    assert raised.value is led[0]
    assert lookup.calls == [deadline.HTTP]  # one call: the follower could not have waited either


def test_an_http_follower_of_a_job_that_ran_out_gets_its_own_kind_of_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A job leader near its end raises job_deadline_exceeded; an HTTP follower that cannot wait 30 s either
    answers as an HTTP trigger does: the throttle error (503 with Retry-After), not the job's code."""
    flight: SingleFlight[str] = SingleFlight()
    lookup = ThrottledLookup(monkeypatch)
    led = lookup.lead(flight, lambda: job_scope(10))
    try:
        with http_scope(5), pytest.raises(DataverseError) as raised:
            flight.do("user", lookup)
    finally:
        lookup.thread.join()
    assert isinstance(led[0], DeadlineExceeded) and led[0].code == "job_deadline_exceeded"
    assert (raised.value.code, raised.value.retry_after) == ("dataverse_throttled", 30)
    assert lookup.calls == [deadline.JOB]
