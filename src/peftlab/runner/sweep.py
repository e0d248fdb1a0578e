"""`peftlab sweep sweep.yaml`: methods x tasks x learning rates x seeds (x k-shot sizes).

A sweep file (YAML or JSON):

    output_dir: runs                      # runs/<task>/<method>/<k>/lr<lr>/seed<seed>/results.json
    launcher: in_process                  # or subprocess (a fresh `python -m peftlab train` per run), or ray
    args: {model_name_or_path: minilm, num_train_epochs: 2, max_seq_length: 64}   # any `peftlab train` argument
    methods: [full, lora, {prompt_tuning: {num_virtual_tokens: 10, learning_rates: [0.3]}}]
    tasks: [movie_reviews, {rte: {dataset_name: super_glue}}, {mine: {train_file: a.csv, text_column: [text]}}]
    learning_rates: [1e-4, 5e-4]          # default grid (a method's own list wins; absent: its recipe's rate)
    seeds: [1, 2, 3]
    k_shots: [null, 16]                   # null = full data
    ray: {address: null, gpus_per_run: 1, cpus_per_run: 4, max_retries: 2}   # launcher ray only (see ray_launcher)

in_process and subprocess run one run after another on this machine; ray runs each run as a Ray task, in parallel,
on a local Ray or a cluster. Each run's output goes to train.log in its folder; the console gets one line per
finished run and a live line (runs done and failed, time left, the foreground run's step, loss and time left).
Runs whose results.json exists are skipped, so an interrupted sweep resumes where it stopped (a run killed half-way
resumes from its last checkpoint); a finished run trained with other settings than the sweep now gives it (its
results.json `hyperparameters`) is refused, never reported as this sweep's. Every run's arguments are checked before
the first one starts; a failed run never stops the others, and the failed runs are returned (and listed by
`peftlab sweep` at the end).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from peftlab.runner.args import RunArguments, apply_recipe, hyperparameters, train_arguments
from peftlab.runner.errors import InputError, NonFiniteLossError
from peftlab.runner.methods import METHODS, method_key
from peftlab.runner.models import model_family
from peftlab.runner.progress import LiveLine, RunProgress, duration, read_progress
from peftlab.runner.train import RESULTS, run_training, this_machine

SWEEP_KEYS = ("output_dir", "launcher", "args", "methods", "tasks", "learning_rates", "seeds", "k_shots", "ray")
LAUNCHERS = ("in_process", "subprocess", "ray")
LOG = "train.log"
RUN_ARGUMENTS = "sweep_run.json"  # a subprocess run's arguments: `peftlab train <this file>`
POLL_S = 1.0  # how often a sweep looks at the progress of runs in other processes
LAUNCHER_ENV = "PEFTLAB_LAUNCHER"  # set for a subprocess run: the launcher its results.json records


@dataclass
class SweepRun:
    task: str
    method: str
    learning_rate: float
    seed: int
    k_shot: int | None
    output_dir: Path
    values: dict[str, Any]  # the run's `peftlab train` arguments by name: the one form a run is passed on in

    @property
    def label(self) -> str:
        k = "full" if self.k_shot is None else f"k={self.k_shot}"
        return f"{self.method} {self.task} lr={self.learning_rate:g} seed={self.seed} {k}"

    def parse(self) -> RunArguments:
        try:
            return train_arguments(self.values)
        except InputError as err:
            raise InputError(f"sweep run {self.label}: {err}") from err


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


def _number(value: Any) -> float:
    """A learning rate; YAML reads `1e-3` (no dot) as a string."""
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise InputError(f"sweep: learning rate {value!r} is not a number") from err


def _recipe_learning_rate(method: str, model: str | None) -> float:
    """The learning rate of a method's recipe for the model's family (a run's folder is named by its rate)."""
    if not model:
        raise InputError("sweep: args.model_name_or_path is required (a model folder, or `minilm`)")
    return METHODS[method].recipe_for(model_family(model)).learning_rate


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
            method = method_key(method_name)
            settings = dict(settings)
            rates = settings.pop("learning_rates", None) or grid
            if not rates:
                model = {**common, **task_settings, **settings}.get("model_name_or_path")
                rates = [_recipe_learning_rate(method, model)]
            for k in k_shots:
                for lr in map(_number, rates):
                    for seed in seeds:
                        out = root / task / method / ("full" if k is None else f"k{k}") / f"lr{lr:g}" / f"seed{seed}"
                        values = {
                            **common,
                            "task_name": task,  # a registered task, or the name of local files (train_file)
                            **task_settings,
                            **settings,
                            "peft_type": method,
                            "learning_rate": float(lr),
                            "seed": int(seed),
                            "k_shot": k,
                            "output_dir": str(out),
                        }
                        runs.append(SweepRun(task, method, float(lr), int(seed), k, out, values))
    return runs


def recorded_settings(args: RunArguments) -> dict[str, Any]:
    """A run's settings as its results.json records them (`hyperparameters`, the method's recipe applied), as JSON
    reads them back."""
    args = apply_recipe(args, model_family(args.model.model_name_or_path))
    return json.loads(json.dumps(hyperparameters(args.model, args.data, args.peft, args.training), default=str))


def changed_settings(run: SweepRun, args: RunArguments) -> dict[str, tuple[Any, Any]]:
    """{setting: (recorded, now)} where the finished run in `run.output_dir` was trained otherwise than `args`."""
    recorded = json.loads((run.output_dir / RESULTS).read_text()).get("hyperparameters", {})
    now = recorded_settings(args)
    return {k: (recorded.get(k), now.get(k)) for k in sorted({*recorded, *now}) if recorded.get(k) != now.get(k)}


def _refuse_stale_runs(runs: list[SweepRun], parsed: list[RunArguments]) -> None:
    """A finished run is skipped only if it was trained as this sweep would train it now: a changed sweep file, or
    a peftlab whose recipe changed (BitFit's schedule did), would otherwise report old runs as new ones. Refused
    before anything trains; nothing saved is touched."""
    stale = [
        (run, changes)
        for run, args in zip(runs, parsed, strict=True)
        if (run.output_dir / RESULTS).is_file() and (changes := changed_settings(run, args))
    ]
    if stale:
        run, changes = stale[0]
        shown = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
        raise InputError(
            f"sweep: {len(stale)} finished run(s) were trained with other settings than this sweep gives them, so "
            f"their results are not this sweep's; e.g. {run.label} in {run.output_dir}: {shown}. Move them away "
            "(or remove them) to rerun, or give the sweep another output_dir"
        )


class SweepProgress:
    """The console of a sweep: one line per finished run (`echo`) and the live line (runs done and failed, time
    left, the foreground run's step, loss and time left)."""

    def __init__(self, todo: int, echo: Callable[[str], None], live: LiveLine, clock: Callable[[], float]):
        self.todo, self.echo, self.live, self.clock = todo, echo, live, clock
        self.started = self.last_finished = clock()
        self.done = self.failed = 0
        self.foreground = ""
        self.foreground_left: float | None = None

    def update(self, run: SweepRun, progress: RunProgress | None = None) -> None:
        """The run in the foreground and where it stands (None: just started)."""
        self.foreground = f"{run.label}: {progress.text() if progress else 'starting'}"
        self.foreground_left = progress.left_s if progress else None
        self._show()

    def finished(self, index: int, total: int, run: SweepRun, ok: bool, message: str, seconds: float) -> None:
        prefix = f"[{index}/{total}] {run.label}"
        self.done += 1
        self.last_finished = self.clock()
        if ok:
            results = json.loads((run.output_dir / RESULTS).read_text())
            line = f"{prefix}: dev {results['dev']['score']:.2f} test {results['test']['score']:.2f} ({seconds:.0f} s)"
        else:
            self.failed += 1
            line = f"{prefix}: FAILED after {seconds:.0f} s: {message} (log: {run.output_dir / LOG})"
        self.live.clear()
        self.echo(line)
        self.foreground, self.foreground_left = "", None
        self._show()

    def left(self) -> float | None:
        """Seconds left: the finished runs' mean time per run for each run not finished, less the time the current
        ones have already run (so the estimate falls while a run trains instead of growing), never below what the
        foreground run itself still needs. None before the first run finishes."""
        if not self.done:
            return None
        per_run = (self.last_finished - self.started) / self.done
        estimate = per_run * (self.todo - self.done) - (self.clock() - self.last_finished)
        return max(estimate, self.foreground_left or 0.0, 0.0)

    def _show(self) -> None:
        left = self.left()
        text = f"sweep: {self.done}/{self.todo} runs done, {self.failed} failed, {duration(left)} left"
        self.live.show(f"{text} | {self.foreground}" if self.foreground else text)

    def close(self) -> None:
        self.live.close()


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
    ours = logging.getLogger("peftlab")
    own_handler = None
    if not logging.getLogger().handlers:  # a Ray worker: no console logging set up; the log file gets ours
        own_handler = logging.StreamHandler(log)
        ours.addHandler(own_handler)
        ours.setLevel(logging.INFO)
    try:
        for h in handlers.values():
            h.setStream(log)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield
    finally:
        for key, h in handlers.items():
            h.setStream(streams[key])
        if own_handler is not None:
            ours.removeHandler(own_handler)


def run_logged(
    run: SweepRun,
    args: RunArguments | None,
    launch: dict[str, str],
    on_progress: Callable[[RunProgress], None] | None = None,
) -> tuple[bool, str, float]:
    """One run of a sweep in this process, its output in its train.log: (finished, why not, seconds).

    args: the run's parsed arguments, or None to parse its values here (a Ray worker).
    """
    run.output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        with open(run.output_dir / LOG, "a", buffering=1) as log, _output_to(log):
            run_training(args or run.parse(), launch=launch, on_progress=on_progress)
        return True, "", time.perf_counter() - started
    except (InputError, NonFiniteLossError) as err:
        return False, str(err), time.perf_counter() - started
    except Exception as err:  # one broken run (e.g. out of memory) must not end the whole sweep
        return False, f"{type(err).__name__}: {err}", time.perf_counter() - started
    finally:
        gc.collect()


def _run_subprocess(run: SweepRun, progress: SweepProgress) -> tuple[bool, str, float]:
    """`python -m peftlab train <sweep_run.json>`; its progress.json is polled for the live line."""
    run.output_dir.mkdir(parents=True, exist_ok=True)
    (run.output_dir / RUN_ARGUMENTS).write_text(json.dumps(run.values, indent=2))
    started = time.perf_counter()
    env = {**os.environ, LAUNCHER_ENV: "subprocess"}
    seen = None
    with open(run.output_dir / LOG, "a", buffering=1) as log:
        command = [sys.executable, "-m", "peftlab", "train", str(run.output_dir / RUN_ARGUMENTS)]
        proc = subprocess.Popen(command, stdout=log, stderr=log, env=env)
        while True:
            try:
                proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                current = read_progress(run.output_dir)
                if current is not None and current != seen:
                    seen = current
                    progress.update(run, current)
    seconds = time.perf_counter() - started
    if proc.returncode == 0:
        return True, "", seconds
    lines = [line for line in (run.output_dir / LOG).read_text().splitlines() if line.strip()]
    return False, (lines[-1] if lines else f"exit code {proc.returncode}"), seconds


def run_sweep(
    spec: dict[str, Any],
    *,
    base_dir: Path | None = None,
    launcher: str | None = None,
    ray_options: dict[str, Any] | None = None,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
    console: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> list[SweepRun]:
    """Run (or list, with dry_run) every run of the sweep; returns the runs that failed.

    ray_options: overrides of the sweep file's `ray` settings (address, gpus_per_run, cpus_per_run, max_retries).
    console: where the live line goes (default: stderr).
    """
    runs = expand(spec, base_dir)
    launcher = launcher or spec.get("launcher", "in_process")
    if launcher not in LAUNCHERS:
        raise InputError(f"sweep: unknown launcher {launcher!r}; allowed: {', '.join(LAUNCHERS)}")
    ray_settings = None
    if launcher == "ray":
        from peftlab.runner.ray_launcher import RaySettings, import_ray

        import_ray()  # a missing extra is named before anything starts
        ray_settings = RaySettings.from_spec({**(spec.get("ray") or {}), **(ray_options or {})})
    parsed = [run.parse() for run in runs]  # every run's arguments are checked before the first run starts
    _refuse_stale_runs(runs, parsed)
    todo: list[tuple[int, SweepRun, RunArguments]] = []
    for i, (run, args) in enumerate(zip(runs, parsed, strict=True), 1):
        prefix = f"[{i}/{len(runs)}] {run.label}"
        if (run.output_dir / RESULTS).is_file():
            echo(f"{prefix}: skipped ({RESULTS} exists)")
        elif dry_run:
            echo(f"{prefix}: would run in {run.output_dir}")
        else:
            todo.append((i, run, args))
    if not todo:
        return []
    progress = SweepProgress(len(todo), echo, LiveLine(console or sys.stderr), clock)
    failed: list[SweepRun] = []

    def finished(i: int, run: SweepRun, ok: bool, message: str, seconds: float) -> None:
        if not ok:
            failed.append(run)
        progress.finished(i, len(runs), run, ok, message, seconds)

    try:
        if ray_settings is not None:
            from peftlab.runner.ray_launcher import run_with_ray

            run_with_ray([(i, run) for i, run, _ in todo], ray_settings, progress, finished)
        else:
            for i, run, args in todo:
                progress.update(run)
                if launcher == "subprocess":
                    outcome = _run_subprocess(run, progress)
                else:
                    on_progress = functools.partial(progress.update, run)
                    outcome = run_logged(run, args, this_machine(launcher), on_progress)
                finished(i, run, *outcome)
    finally:
        progress.close()
    return failed
