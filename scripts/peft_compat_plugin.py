"""pytest plugin that `scripts/peft_compat.py` loads on both sides: records outcomes, narrows the stock side, and
(offline) makes Hub requests fail at once.

- PEFT_COMPAT_OUTCOMES=<file>: one JSON line per test, {"test": node id, "outcome": passed|failed|skipped,
  "message": first line of the error}, written by the controller only (pytest-xdist forwards workers' reports).
- PEFT_COMPAT_RERUN_FROM=<file of the peftlab side's outcomes>: the stock side deselects the tests that passed with
  peftlab imported. A test can only be broken by peftlab if it does not pass with it, so the verdict is the same as
  running every test twice, at a fraction of the time (PEFT's custom-model tests alone are ~20,000).
- HF_HUB_OFFLINE=1: PEFT's `hub_online_once` turns offline mode off for the first use of each model id, and
  huggingface_hub then retries every unreachable request with back-off (1 + 2 + 4 + 8 + 8 s): about 45 s per test,
  hours over the suite. Without retries such a test fails at once; which tests pass is unchanged.
"""

from __future__ import annotations

import json
import os

import pytest

_RANK = {"passed": 0, "skipped": 1, "failed": 2}
_config: pytest.Config | None = None
_outcomes: dict[str, tuple[str, str]] = {}

if os.environ.get("HF_HUB_OFFLINE") == "1":
    from huggingface_hub.utils import _http

    _stock_backoff = _http._http_backoff_base

    def _without_retries(*args, **kwargs):
        kwargs["max_retries"] = 0
        return _stock_backoff(*args, **kwargs)

    _http._http_backoff_base = _without_retries  # http_backoff / http_stream_backoff look it up at call time


def read_outcomes(path: str) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {row["test"]: row for row in map(json.loads, f) if row}


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    source = os.environ.get("PEFT_COMPAT_RERUN_FROM")
    if not source:
        return
    passed = {test for test, row in read_outcomes(source).items() if row["outcome"] == "passed"}
    keep = [item for item in items if item.nodeid not in passed]
    config.hook.pytest_deselected(items=[item for item in items if item.nodeid in passed])
    items[:] = keep


def _record(test: str, outcome: str, message: str) -> None:
    if _RANK[outcome] >= _RANK[_outcomes.get(test, ("passed", ""))[0]]:
        _outcomes[test] = (outcome, message)


def _first_line(report: pytest.TestReport | pytest.CollectReport) -> str:
    """The first `E ...` line of the error (pytest's message line), else the last line of the report."""
    lines = [line.strip() for line in report.longreprtext.splitlines() if line.strip()]
    return next((line[1:].strip() for line in lines if line.startswith("E ")), lines[-1] if lines else "")[:300]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _config is None or hasattr(_config, "workerinput"):  # xdist workers: the controller records
        return
    if report.failed:
        _record(report.nodeid, "failed", _first_line(report))
    elif report.skipped:
        _record(report.nodeid, "skipped", "")
    elif report.when == "call":
        _record(report.nodeid, "passed", "")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed and _config is not None and not hasattr(_config, "workerinput"):
        _record(report.nodeid, "failed", "collection error: " + _first_line(report))


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("PEFT_COMPAT_OUTCOMES")
    if not path or hasattr(session.config, "workerinput"):
        return
    with open(path, "w") as f:
        for test, (outcome, message) in sorted(_outcomes.items()):
            f.write(json.dumps({"test": test, "outcome": outcome, "message": message}) + "\n")
