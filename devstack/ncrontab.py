"""NCRONTAB schedules as the Azure Functions timer trigger reads them.

The Functions host uses NCrontab with six fields, seconds first
(``{second} {minute} {hour} {day} {month} {day-of-week}``); a five-field expression means second 0.
Day of month and day of week must *both* match (NCrontab's rule, unlike Vixie cron's "either"),
Sunday is 0, and month/day names (JAN, MON) are accepted.  ``croniter`` puts seconds last and ORs
the day fields by default, so the host parses schedules itself; the unit tests check it against
croniter (seconds moved, ``day_or=False``) as an oracle.  A ``hh:mm:ss`` TimeSpan schedule (App
Service plans only in Azure) is accepted as a fixed interval.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
# name, low, high, names (index 0 == low)
_FIELDS: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("second", 0, 59, ()),
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day", 1, 31, ()),
    ("month", 1, 12, _MONTHS),
    ("day-of-week", 0, 6, _DAYS),
)
_TIMESPAN = re.compile(r"^(?:(\d+)\.)?(\d{1,2}):(\d{1,2})(?::(\d{1,2}))?$")
_SEARCH_YEARS = 50  # a weekday falls on a given date again within 28 years (Feb 29: 28)


class ScheduleError(ValueError):
    """The schedule text is not a valid NCRONTAB expression; the message says which part and why."""


def _value(token: str, field: str, low: int, high: int, names: tuple[str, ...]) -> int:
    upper = token.upper()
    if names and upper in names:
        return low + names.index(upper)
    if not token.isdigit():
        raise ScheduleError(f"{field}: {token!r} is not a number")
    number = int(token)
    if not low <= number <= high:
        raise ScheduleError(f"{field}: {number} is outside {low}-{high}")
    return number


def _field(text: str, field: str, low: int, high: int, names: tuple[str, ...]) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise ScheduleError(f"{field}: empty list item in {text!r}")
        base, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ScheduleError(f"{field}: step {step_text!r} must be a positive number")
            step = int(step_text)
        if base == "*":
            start, stop = low, high
        elif "-" in base:
            first, _, last = base.partition("-")
            start = _value(first, field, low, high, names)
            stop = _value(last, field, low, high, names)
            if start > stop:
                raise ScheduleError(f"{field}: range {base!r} runs backwards")
        else:
            start = _value(base, field, low, high, names)
            stop = high if step_text else start  # NCrontab: "5/15" means 5, 20, 35, 50
        values.update(range(start, stop + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule: either cron fields or a fixed interval."""

    text: str
    seconds: frozenset[int] = frozenset()
    minutes: frozenset[int] = frozenset()
    hours: frozenset[int] = frozenset()
    days: frozenset[int] = frozenset()
    months: frozenset[int] = frozenset()
    weekdays: frozenset[int] = frozenset()
    interval: timedelta | None = None

    def next_after(self, moment: datetime) -> datetime:
        """The first occurrence strictly after ``moment`` (same tzinfo; whole seconds)."""
        if self.interval is not None:
            return moment.replace(microsecond=0) + self.interval
        t = moment.replace(microsecond=0) + timedelta(seconds=1)
        limit = t.year + _SEARCH_YEARS
        while t.year <= limit:
            if t.month not in self.months:
                year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
                t = t.replace(year=year, month=month, day=1, hour=0, minute=0, second=0)
                continue
            # Python weekday(): Monday 0; NCRONTAB: Sunday 0.
            if t.day not in self.days or (t.weekday() + 1) % 7 not in self.weekdays:
                t = t.replace(hour=0, minute=0, second=0) + timedelta(days=1)
                continue
            if t.hour not in self.hours:
                t = t.replace(minute=0, second=0) + timedelta(hours=1)
                continue
            if t.minute not in self.minutes:
                t = t.replace(second=0) + timedelta(minutes=1)
                continue
            if t.second not in self.seconds:
                t += timedelta(seconds=1)
                continue
            return t
        raise ScheduleError(f"{self.text!r} never occurs (no match within {_SEARCH_YEARS} years)")


def parse(text: str) -> Schedule:
    """Parse an NCRONTAB expression (6 fields, or 5 with second 0) or a ``[d.]hh:mm[:ss]`` interval."""
    stripped = text.strip()
    timespan = _TIMESPAN.match(stripped)
    if timespan:
        days, hours, minutes, seconds = (int(g) if g else 0 for g in timespan.groups())
        interval = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
        if interval <= timedelta(0):
            raise ScheduleError(f"interval {text!r} must be positive")
        return Schedule(text=text, interval=interval)
    parts = stripped.split()
    if len(parts) == 5:
        parts = ["0", *parts]
    if len(parts) != 6:
        raise ScheduleError(
            f"{text!r} has {len(parts)} fields; NCRONTAB needs six: "
            "{second} {minute} {hour} {day} {month} {day-of-week}"
        )
    sets = [_field(part, *spec) for part, spec in zip(parts, _FIELDS, strict=True)]
    schedule = Schedule(
        text, seconds=sets[0], minutes=sets[1], hours=sets[2], days=sets[3], months=sets[4], weekdays=sets[5]
    )
    # 2024 is a leap year: February 29 counts as a day that occurs.
    if not any(day <= calendar.monthrange(2024, month)[1] for month in sets[4] for day in sets[3]):
        raise ScheduleError(f"{text!r} never occurs: no selected month has the selected days")
    return schedule
