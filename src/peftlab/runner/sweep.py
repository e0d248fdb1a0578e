"""`peftlab sweep sweep.yaml`: methods x tasks x learning rates x seeds (x k-shot sizes), one run after another.

A sweep file (YAML or JSON):

    output_dir: runs                      # runs/<task>/<method>/<k>/lr<lr>/seed<seed>/results.json
    launcher: in_process                  # or subprocess (one fresh `python -m peftlab train` per run)
    args: {model_name_or_path: minilm, num_train_epochs: 2, max_seq_length: 64}   # any `peftlab train` argument
    methods: [full, lora, {prompt_tuning: {num_virtual_tokens: 10, learning_rates: [0.3]}}]
    tasks: [movie_reviews, {rte: {dataset_name: super_glue}}, {mine: {train_file: a.csv, text_column: [text]}}]
    learning_rates: [1e-4, 5e-4]          # default grid (a method's own list wins; absent: its typical rate)
    seeds: [1, 2, 3]
    k_shots: [null, 16]                   # null = full data

Each run's output goes to train.log in its folder; the console gets one progress line per run.
Runs whose results.json exists are skipped, so an interrupted sweep resumes where it stopped (a run killed half-way
resumes from its last checkpoint). Every run is checked before the first one starts.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from peftlab.runner.args import parse_train_args, read_config_file, to_flags
from peftlab.runner.errors import InputError, NonFiniteLossError
from peftlab.runner.methods import get_method, normalise_method_name
from peftlab.runner.train import RESULTS, run_training

SWEEP_KEYS = ("output_dir", "launcher", "args", "methods", "tasks", "learning_rates", "seeds", "k_shots")
LAUNCHERS = ("in_process", "subprocess")


@dataclass
class SweepRun:
    task: str
    method: str
    learning_rate: float
    seed: int
    k_shot: int | None
    output_dir: Path
    arguments: dict[str, Any]

    @property
    def label(self) -> str:
        k = "full" if self.k_shot is None else f"k={self.k_shot}"
        return f"{self.method} {self.task} lr={self.learning_rate:g} seed={self.seed} {k}"

    def argv(self) -> list[str]:
        return to_flags(self.arguments)


def _named_entries(entries: Any, what: str) -> list[tuple[str, dict[str, Any]]]:
    """A list of names, or of {name: {settings}} mappings, or one mapping of names to settings."""
    if isinstance(entries, dict):
        entries = [{k: v} for k, v in entries.items()]
    if not isinstance(entries, list) or not entries:
        raise InputError(f"sweep: {what} must be a non-empty list")
    out = []
    for entry in entries:
        if isinstance(entry, str):
            out.append((entry, {}))
        elif isinstance(entry, dict) and len(entry) == 1:
            name, settings = next(iter(entry.items()))
            out.append((str(name), dict(settings or {})))
        else:
            raise InputError(f"sweep: each of {what} is a name or a one-key mapping name -> settings, got {entry!r}")
    return out


def _task_arguments(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """A registered task by its name, or local files (`train_file`; the name then labels the task)."""
    return {"task_name": name, **settings}


def _number(value: Any) -> float:
    """A learning rate; YAML reads `1e-3` (no dot) as a string."""
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise InputError(f"sweep: learning rate {value!r} is not a number") from err


def expand(spec: dict[str, Any], base_dir: Path | None = None) -> list[SweepRun]:
    """All runs of a sweep in order (task, method, k, learning rate, seed)."""
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise InputError(f"sweep: unknown key {unknown[0]!r}; allowed: {', '.join(SWEEP_KEYS)}")
    root = Path(spec.get("output_dir", "runs"))
    if base_dir is not None and not root.is_absolute():
        root = base_dir / root
    common = dict(spec.get("args") or {})
    for key in ("output_dir", "peft_type", "learning_rate", "seed", "k_shot", "task_name"):
        if key in common:
            raise InputError(f"sweep: args.{key} is set by the sweep itself; use the sweep's own keys instead")
    grid = spec.get("learning_rates")
    seeds = spec.get("seeds", [42])
    k_shots = spec.get("k_shots", [None])
    runs = []
    for task, task_settings in _named_entries(spec.get("tasks"), "tasks"):
        for method_name, settings in _named_entries(spec.get("methods"), "methods"):
            method = normalise_method_name(method_name)
            settings = dict(settings)
            rates = settings.pop("learning_rates", None) or grid or [get_method(method).learning_rate]
            for k in k_shots:
                for lr in map(_number, rates):
                    for seed in seeds:
                        out = root / task / method / ("full" if k is None else f"k{k}") / f"lr{lr:g}" / f"seed{seed}"
                        arguments = {
                            **common,
                            **_task_arguments(task, task_settings),
                            **settings,
                            "peft_type": method,
                            "learning_rate": float(lr),
                            "seed": int(seed),
                            "k_shot": k,
                            "output_dir": str(out),
                        }
                        runs.append(SweepRun(task, method, float(lr), int(seed), k, out, arguments))
    return runs


LOG = "train.log"


@contextlib.contextmanager
def _output_to(log: TextIO) -> Iterator[None]:
    """Send prints, warnings and log records (ours and transformers') of one in-process run to its log file."""
    consoles = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    handlers = {
        id(h): h
        for name in (None, "transformers")
        for h in logging.getLogger(name).handlers
        if type(h) is logging.StreamHandler and h.stream in consoles
    }
    streams = {key: h.stream for key, h in handlers.items()}
    try:
        for h in handlers.values():
            h.setStream(log)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield
    finally:
        for key, h in handlers.items():
            h.setStream(streams[key])


def _run_in_process(run: SweepRun) -> tuple[bool, str]:
    run.output_dir.mkdir(parents=True, exist_ok=True)
    try:
        with open(run.output_dir / LOG, "a", buffering=1) as log, _output_to(log):
            run_training(*parse_train_args(run.argv()))
        return True, ""
    except (InputError, NonFiniteLossError) as err:
        return False, str(err)
    except Exception as err:  # one broken run (e.g. out of memory) must not end the whole sweep
        return False, f"{type(err).__name__}: {err}"
    finally:
        gc.collect()


def _run_subprocess(run: SweepRun) -> tuple[bool, str]:
    run.output_dir.mkdir(parents=True, exist_ok=True)
    with open(run.output_dir / LOG, "a", buffering=1) as log:
        proc = subprocess.run([sys.executable, "-m", "peftlab", "train", *run.argv()], stdout=log, stderr=log)
    if proc.returncode == 0:
        return True, ""
    lines = [line for line in (run.output_dir / LOG).read_text().splitlines() if line.strip()]
    return False, lines[-1] if lines else f"exit code {proc.returncode}"


def run_sweep(
    spec: dict[str, Any],
    *,
    base_dir: Path | None = None,
    launcher: str | None = None,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> list[SweepRun]:
    """Run (or list, with dry_run) every run of the sweep; returns the runs that failed."""
    runs = expand(spec, base_dir)
    launcher = launcher or spec.get("launcher", "in_process")
    if launcher not in LAUNCHERS:
        raise InputError(f"sweep: unknown launcher {launcher!r}; allowed: {', '.join(LAUNCHERS)}")
    for run in runs:  # every run's arguments are checked before the first run starts
        try:
            parse_train_args(run.argv())
        except InputError as err:
            raise InputError(f"sweep run {run.label}: {err}") from err
    failed: list[SweepRun] = []
    total = len(runs)
    execute = _run_in_process if launcher == "in_process" else _run_subprocess
    for i, run in enumerate(runs, 1):
        prefix = f"[{i}/{total}] {run.label}"
        if (run.output_dir / RESULTS).is_file():
            echo(f"{prefix}: skipped ({RESULTS} exists)")
            continue
        if dry_run:
            echo(f"{prefix}: would run in {run.output_dir}")
            continue
        started = time.perf_counter()
        ok, message = execute(run)
        seconds = time.perf_counter() - started
        if ok:
            results = json.loads((run.output_dir / RESULTS).read_text())
            echo(f"{prefix}: dev {results['dev']['score']:.2f} test {results['test']['score']:.2f} ({seconds:.0f} s)")
        else:
            failed.append(run)
            echo(f"{prefix}: FAILED after {seconds:.0f} s: {message} (log: {run.output_dir / LOG})")
    return failed


def load_sweep_file(path: str | Path) -> dict[str, Any]:
    return read_config_file(path)
