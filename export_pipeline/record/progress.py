"""A device's progress as the record stores it: one JSON value per device in Dagster's key-value
table, with the version of its form in it (`v`).

A value is read through the migrations from its version to the current one, so a value written
by an earlier release (or by a run of one still in flight during an upgrade) reads the same as a
new one, and the next write stores it in the current form. Dropping an old form is a change of
`OLDEST_PROGRESS_FORM` with a test: a value older than that is refused, naming its version.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

from export_pipeline.engine.progress import DayTotals, Progress
from export_pipeline.settings import SEED_FIELDS

PROGRESS_FORM = 2
OLDEST_PROGRESS_FORM = 1


class RecordFormError(ValueError):
    """A value of the export record has a form this release cannot read."""


def progress_json(progress: Progress) -> str:
    """The stored form of `progress` (the current one)."""
    totals = progress.totals
    state: dict[str, Any] = {
        "v": PROGRESS_FORM,
        "through": progress.through.timestamp(),
        "day": progress.day.isoformat(),
        "totals": None
        if totals is None
        else {"rows": totals.rows, "files": totals.files, "counts": dict(totals.counts)},
    }
    return json.dumps(state, separators=(",", ":"))


def progress_of_json(text: str, *, key: str) -> Progress:
    """The progress stored as `text` under `key` (named in errors), in whatever form it has."""
    state = json.loads(text)
    form = state.get("v", 1)  # the first form had no version
    if not isinstance(form, int) or not OLDEST_PROGRESS_FORM <= form <= PROGRESS_FORM:
        raise RecordFormError(
            f"{key}: progress of form {form!r}; this release reads forms "
            f"{OLDEST_PROGRESS_FORM} to {PROGRESS_FORM} (a newer release wrote it: upgrade)"
        )
    for upgrade in _UPGRADES[form - OLDEST_PROGRESS_FORM :]:
        state = upgrade(state)
    found = state["totals"]
    totals = (
        None if found is None else DayTotals(found["rows"], found["files"], dict(found["counts"]))
    )
    return Progress(
        datetime.fromtimestamp(state["through"], UTC), date.fromisoformat(state["day"]), totals
    )


def _from_form_1(state: dict[str, Any]) -> dict[str, Any]:
    """Form 1 held the totals as a list: rows, files, and the four fields' counts in order."""
    found = state["totals"]
    totals = (
        None
        if found is None
        else {
            "rows": found[0],
            "files": found[1],
            "counts": dict(zip(SEED_FIELDS, found[2], strict=True)),
        }
    )
    return {**state, "v": 2, "totals": totals}


# Each upgrades a value of form N (index N - OLDEST_PROGRESS_FORM) to form N + 1.
_UPGRADES: list[Callable[[dict[str, Any]], dict[str, Any]]] = [_from_form_1]
assert len(_UPGRADES) == PROGRESS_FORM - OLDEST_PROGRESS_FORM
