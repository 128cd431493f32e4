"""Shared test fixtures: the notebook run times, printed as a table at the end of the run."""

from __future__ import annotations

import math

import pytest

NOTEBOOK_TIMES = pytest.StashKey[dict]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[NOTEBOOK_TIMES] = {}


@pytest.fixture
def notebook_times(request: pytest.FixtureRequest) -> dict:
    """``{notebook file name: wall seconds}`` of this run (NaN for a notebook that failed)."""
    return request.config.stash[NOTEBOOK_TIMES]


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    times = config.stash.get(NOTEBOOK_TIMES, {})
    if not times:
        return
    terminalreporter.section("notebook run times")
    for name, seconds in sorted(times.items()):
        shown = "failed" if math.isnan(seconds) else f"{seconds:6.1f} s"
        terminalreporter.write_line(f"{name:<40} {shown:>9}")
    total = sum(s for s in times.values() if not math.isnan(s))
    terminalreporter.write_line(f"{'total':<40} {total:6.1f} s")


# ---------------------------------------------------------------- random-weight pipelines, built once
@pytest.fixture(scope="module")
def sd1_pipe():
    """A tiny random-weight SD 1.x pipeline (shared by a module's tests; they leave it as they found it)."""
    from sdlens.models.families import sd1

    return sd1()
