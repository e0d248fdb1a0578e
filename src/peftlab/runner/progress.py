"""Live progress on the console: the step, loss and time left of the run in the foreground (at least every 30 s)
and, in a sweep, one line for the whole sweep. Full logs stay in each run's train.log.

A run reports through `ProgressCallback`, which also writes `progress.json` into its output dir: that file is how
a sweep follows runs in other processes (subprocess launcher) or on other machines (Ray, on a shared filesystem).
On a terminal the line is rewritten in place; otherwise (a log file, CI) each update is a plain line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from transformers import TrainerCallback

PROGRESS = "progress.json"
REPORT_EVERY_S = 30.0


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


@dataclass
class RunProgress:
    """Where one run stands; `left_s` extrapolates the steps done in this process (a resumed run counts its own)."""

    step: int
    max_steps: int
    loss: float | None
    elapsed_s: float
    left_s: float | None
    updated: float

    def text(self) -> str:
        loss = "?" if self.loss is None else f"{self.loss:.4f}"
        return f"step {self.step}/{self.max_steps}, loss {loss}, {duration(self.left_s)} left"


def read_progress(output_dir: Path) -> RunProgress | None:
    try:
        return RunProgress(**json.loads((output_dir / PROGRESS).read_text()))
    except (OSError, ValueError, TypeError):
        return None


class ProgressCallback(TrainerCallback):
    """Reports after the first step, then at least every `every_s` seconds (at step ends), and at the end.

    loss: the mean training loss since the previous report (the trainer's own, every step), or None.
    """

    def __init__(
        self,
        output_dir: Path,
        loss: Callable[[], float | None],
        report: Callable[[RunProgress], None] | None = None,
        every_s: float = REPORT_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.output_dir, self.loss, self.report, self.every_s, self.clock = output_dir, loss, report, every_s, clock
        self.started = self.last = 0.0
        self.first_step = self.reported_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = self.clock()
        self.last = -float("inf")
        self.first_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.clock() - self.last >= self.every_s or state.global_step == state.max_steps:
            self._emit(state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.reported_step != state.global_step:  # e.g. early stopping before max_steps
            self._emit(state)

    def _emit(self, state) -> None:
        now = self.clock()
        self.last, self.reported_step = now, state.global_step
        loss = self.loss()
        if not state.is_world_process_zero:
            return
        elapsed, done = now - self.started, state.global_step - self.first_step
        left = elapsed / done * max(state.max_steps - state.global_step, 0) if done > 0 else None
        progress = RunProgress(state.global_step, state.max_steps, loss, elapsed, left, time.time())
        tmp = self.output_dir / f".{PROGRESS}.tmp"
        tmp.write_text(json.dumps(asdict(progress)))
        tmp.replace(self.output_dir / PROGRESS)
        if self.report is not None:
            self.report(progress)


class LiveLine:
    """One status line on `stream`: rewritten in place on a terminal, plain lines otherwise."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.shown = ""

    def show(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
        elif text != self.shown:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.shown = text

    def clear(self) -> None:
        """Before other output on a terminal: take the line away (`show` puts it back)."""
        if self.tty and self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def close(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()
        self.shown = ""
