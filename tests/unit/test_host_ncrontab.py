"""NCRONTAB parsing of the local host: examples from the Functions docs, errors, and croniter as an oracle."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from croniter import croniter
from hypothesis import given, settings
from hypothesis import strategies as st

from devstack import ncrontab

START = datetime(2024, 1, 1, 0, 0, 0, tzinfo=UTC)  # a Monday


def occurrences(expression: str, start: datetime = START, count: int = 3) -> list[datetime]:
    schedule = ncrontab.parse(expression)
    moments = []
    moment = start
    for _ in range(count):
        moment = schedule.next_after(moment)
        moments.append(moment)
    return moments


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def test_seconds_come_first() -> None:
    assert occurrences("5 * * * * *") == [
        at(2024, 1, 1, 0, 0, 5), at(2024, 1, 1, 0, 1, 5), at(2024, 1, 1, 0, 2, 5)
    ]


def test_project_default_schedule_runs_every_six_hours() -> None:
    assert occurrences("0 0 */6 * * *") == [at(2024, 1, 1, 6), at(2024, 1, 1, 12), at(2024, 1, 1, 18)]


def test_docs_examples() -> None:
    assert occurrences("0 */5 * * * *", count=2) == [at(2024, 1, 1, 0, 5), at(2024, 1, 1, 0, 10)]
    assert occurrences("0 30 9 * * 1-5", start=at(2024, 1, 5, 10), count=2) == [
        at(2024, 1, 8, 9, 30), at(2024, 1, 9, 9, 30)  # Friday after 9:30 -> Monday, Tuesday
    ]
    assert occurrences("0 0 9-17 * * MON-FRI", start=at(2024, 1, 6), count=1) == [at(2024, 1, 8, 9)]
    assert occurrences("0 0 0 1 JAN,JUL *", count=2) == [at(2024, 7, 1), at(2025, 1, 1)]


def test_day_of_month_and_day_of_week_must_both_match() -> None:
    # The 13th that is a Friday (NCrontab ANDs the day fields; Vixie cron would OR them).
    assert occurrences("0 0 0 13 * FRI", count=2) == [at(2024, 9, 13), at(2024, 12, 13)]


def test_step_from_a_start_value_runs_to_the_end_of_the_range() -> None:
    assert occurrences("0 5/20 * * * *", count=4) == [
        at(2024, 1, 1, 0, 5), at(2024, 1, 1, 0, 25), at(2024, 1, 1, 0, 45), at(2024, 1, 1, 1, 5)
    ]


def test_five_fields_mean_second_zero() -> None:
    assert occurrences("*/15 * * * *", count=2) == [at(2024, 1, 1, 0, 15), at(2024, 1, 1, 0, 30)]


def test_leap_day_is_found() -> None:
    assert occurrences("0 0 0 29 2 *", count=2) == [at(2024, 2, 29), at(2028, 2, 29)]


def test_a_rare_weekday_date_is_found_years_ahead() -> None:
    assert occurrences("0 0 0 29 2 MON", count=1) == [at(2044, 2, 29)]


def test_timespan_is_an_interval() -> None:
    schedule = ncrontab.parse("00:00:30")
    assert schedule.interval == timedelta(seconds=30)
    assert schedule.next_after(START) == START + timedelta(seconds=30)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("0 0 * * *  * *", "has 7 fields"),
        ("60 * * * * *", "second: 60 is outside 0-59"),
        ("0 0 25 * * *", "hour: 25 is outside 0-23"),
        ("0 0 0 0 * *", "day: 0 is outside 1-31"),
        ("0 0 0 * 13 *", "month: 13 is outside 1-12"),
        ("0 0 0 * * 7", "day-of-week: 7 is outside 0-6"),
        ("0 */0 * * * *", "step '0' must be a positive number"),
        ("0 30-10 * * * *", "runs backwards"),
        ("0 x * * * *", "minute: 'x' is not a number"),
        ("0 0 0 31 2 *", "never occurs"),
        ("0 0 0 1,,2 * *", "empty list item"),
        ("00:00:00", "must be positive"),
    ],
)
def test_invalid_schedules_say_what_is_wrong(expression: str, message: str) -> None:
    with pytest.raises(ncrontab.ScheduleError, match=message):
        ncrontab.parse(expression)


def _field(low: int, high: int) -> st.SearchStrategy[str]:
    number = st.integers(low, high).map(str)
    # croniter misreads a one-value range such as "0-0" (it matches everything), so spans are proper.
    span = st.tuples(st.integers(low, high - 1), st.integers(1, high - low)).map(
        lambda pair: f"{pair[0]}-{min(high, pair[0] + pair[1])}"
    )
    step = st.tuples(st.sampled_from(["*", *[str(n) for n in range(low, high)]]), st.integers(1, 12)).map(
        lambda pair: f"{pair[0]}/{pair[1]}" if pair[0] == "*" else f"{pair[0]}-{high}/{pair[1]}"
    )
    item = st.one_of(st.just("*"), number, span, step)
    return st.lists(item, min_size=1, max_size=3).map(",".join)


@settings(max_examples=150, deadline=None)
@given(
    second=_field(0, 59), minute=_field(0, 59), hour=_field(0, 23), day=_field(1, 28),
    month=_field(1, 12), weekday=_field(0, 6),
    start=st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1)),
)
def test_matches_croniter_with_seconds_first_and_anded_days(
    second: str, minute: str, hour: str, day: str, month: str, weekday: str, start: datetime
) -> None:
    expression = f"{second} {minute} {hour} {day} {month} {weekday}"
    start = start.replace(microsecond=0, tzinfo=UTC)
    oracle = croniter(expression, start, day_or=False, second_at_beginning=True)
    try:
        expected = oracle.get_next(datetime)
    except Exception:  # croniter gives up (no match within its search window)
        return
    assert ncrontab.parse(expression).next_after(start) == expected
