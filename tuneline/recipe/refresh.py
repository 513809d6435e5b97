"""The recipe's `refresh` section: when the `refresh` flow re-fetches the sources and retrains.

A cron expression or an interval, in a time zone; `tuneline deploy` turns it into the refresh
deployment's schedule through `RefreshSpec.schedule()`. The cron string is checked with croniter,
the parser Prefect's own cron schedules use (vendored there), so a recipe that loads also deploys;
the recipe package never imports Prefect.
"""

from __future__ import annotations

from typing import Literal, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from croniter import croniter
from pydantic import Field, field_validator, model_validator

from tuneline.recipe.section import Section


class RefreshSchedule(NamedTuple):
    """A deployment schedule: `kind` cron (value: the cron string) or interval (value: seconds)."""

    kind: Literal["cron", "interval"]
    value: str | float
    timezone: str


class RefreshSpec(Section):
    """When the `refresh` flow runs: re-fetch the sources, and retrain only when the data changed."""

    cron: str | None = Field(
        None,
        description="Cron expression of the refresh schedule, e.g. '0 3 * * *' (03:00 every day); "
        "set this or interval_minutes.",
        examples=["0 3 * * *"],
    )
    interval_minutes: float | None = Field(
        None, gt=0, description="Minutes between refreshes; set this or cron."
    )
    timezone: str = Field("UTC", description="IANA time zone the schedule runs in, e.g. Europe/Berlin.")

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, cron: str | None) -> str | None:
        if cron is None:
            return None
        # Prefect refuses croniter's random (R) and hashed (H) fields: so does the recipe.
        if not croniter.is_valid(cron) or any(part.upper() in ("R", "H") for part in cron.split()):
            raise ValueError(
                f"not a cron expression: {cron!r}; write five fields, minute hour day month weekday, "
                "e.g. '0 3 * * *' for 03:00 every day or '*/30 * * * *' for every 30 minutes"
            )
        return cron

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, timezone: str) -> str:
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            close = sorted(name for name in available_timezones() if timezone.lower() in name.lower())[:5]
            hint = f" (close: {', '.join(close)})" if close else ""
            raise ValueError(
                f"unknown time zone {timezone!r}{hint}; use an IANA name such as UTC or Europe/Berlin"
            ) from None
        return timezone

    @model_validator(mode="after")
    def _one_schedule(self) -> RefreshSpec:
        if (self.cron is None) == (self.interval_minutes is None):
            raise ValueError(
                "set exactly one of refresh.cron (e.g. '0 3 * * *') and refresh.interval_minutes"
            )
        return self

    def schedule(self) -> RefreshSchedule:
        """The deployment schedule: ("cron", "0 3 * * *", tz) or ("interval", seconds, tz)."""
        if self.cron is not None:
            return RefreshSchedule("cron", self.cron, self.timezone)
        return RefreshSchedule("interval", float(self.interval_minutes) * 60, self.timezone)
