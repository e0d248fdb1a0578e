"""`peftlab sweep` (grid expansion, skipping finished runs, failures, both launchers) and `peftlab report`."""

from __future__ import annotations

import io
import json
import statistics
import types
from pathlib import Path

import pytest
from runner_tiny import save_model, sentiment_rows, write_csv

from peftlab import cli
from peftlab.runner import report as report_mod
from peftlab.runner.errors import InputError
from peftlab.runner.progress import LiveLine, RunProgress
from peftlab.runner.sweep import SweepProgress, expand, run_sweep


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sweep-assets")
    return {"bert": save_model(root, "bert"), "csv": write_csv(root / "train.csv", sentiment_rows(60))}


def spec_for(assets, out: Path, **overrides) -> dict:
    spec = {
        "output_dir": str(out),
        "args": {
            "model_name_or_path": str(assets["bert"]),
            "train_file": str(assets["csv"]),
            "text_column": ["sentence"],
            "max_steps": 2,
            "report_to": "none",
            "disable_tqdm": True,
            "save_strategy": "no",
            "eval_strategy": "no",
            "per_device_train_batch_size": 8,
        },
        "methods": ["full", {"prompt_tuning": {"num_virtual_tokens": 4, "learning_rates": ["3e-1"]}}],
        "tasks": ["toy"],
        "learning_rates": [1e-3, 1e-2],
        "seeds": [1, 2],
    }
    spec.update(overrides)
    return spec


def test_expand_is_the_cross_product_with_per_method_rates(assets, tmp_path):
    runs = expand(spec_for(assets, tmp_path / "runs", k_shots=[None, 4]))
    assert len(runs) == 2 * (2 * 2) + 2 * (1 * 2)  # k settings x (lrs x seeds) for full, 1 lr for prompt tuning
    first = runs[0]
    assert first.output_dir == tmp_path / "runs" / "toy" / "full" / "full" / "lr0.001" / "seed1"
    assert first.values["task_name"] == "toy" and first.values["peft_type"] == "full"
    pt = [r for r in runs if r.method == "prompt_tuning"]
    assert {r.learning_rate for r in pt} == {0.3} and all(r.values["num_virtual_tokens"] == 4 for r in pt)
    assert {r.k_shot for r in runs} == {None, 4} and runs[-1].output_dir.parts[-3] == "k4"
    with pytest.raises(InputError, match="unknown key 'method'"):
        expand({**spec_for(assets, tmp_path), "method": ["lora"]})
    with pytest.raises(InputError, match="args.learning_rate is set by the sweep"):
        expand(spec_for(assets, tmp_path, args={"learning_rate": 1}))
    with pytest.raises(InputError, match="unknown method"):
        expand(spec_for(assets, tmp_path, methods=["loraa"]))


def test_bad_run_arguments_are_refused_before_the_first_run(assets, tmp_path):
    spec = spec_for(assets, tmp_path / "runs", methods=[{"lora": {"num_virtual_tokens": 3}}])
    with pytest.raises(InputError, match="--num_virtual_tokens is not an option of method 'lora'"):
        run_sweep(spec, echo=lambda line: None)
    assert not (tmp_path / "runs").exists()


def test_sweep_runs_skips_finished_runs_and_survives_a_failing_one(assets, tmp_path):
    out = tmp_path / "runs"
    spec = spec_for(
        assets,
        out,
        learning_rates=[1e-3],
        # warmup_steps 0 (LoRA's recipe warms up): the second step already trains at 1e30
        methods=[
            "full",
            {"lora": {"learning_rates": [1e30], "warmup_steps": 0, "save_strategy": "steps", "save_steps": 1}},
        ],
    )
    lines: list[str] = []
    console = io.StringIO()  # not a terminal: the live line comes as plain lines
    failed = run_sweep(spec, echo=lines.append, console=console)
    assert len(lines) == 4 and [r.method for r in failed] == ["lora", "lora"]
    live = console.getvalue().splitlines()
    assert (
        "\r" not in console.getvalue()
        and live[0] == "sweep: 0/4 runs done, 0 failed, ? left | full toy lr=0.001 seed=1 full: starting"
    )
    assert any(
        line.startswith("sweep: 0/4 runs done, 0 failed, ? left | full toy lr=0.001 seed=1 full: step 1/2, loss ")
        for line in live
    )
    assert "sweep: 2/4 runs done, 0 failed, " in console.getvalue() and live[-1].startswith(
        "sweep: 4/4 runs done, 2 failed, 0 s left"
    )
    assert lines[0].startswith("[1/4] full toy lr=0.001 seed=1 full: dev ") and " test " in lines[0]
    assert "FAILED" in lines[2] and "loss became nan at step 2" in lines[2] and "train.log" in lines[2]
    assert (out / "toy" / "full" / "full" / "lr0.001" / "seed2" / "results.json").is_file()
    assert (out / "toy" / "full" / "full" / "lr0.001" / "seed1" / "train.log").stat().st_size > 0
    lines.clear()
    run_sweep(spec, echo=lines.append, dry_run=True)
    assert lines[0].endswith("skipped (results.json exists)") and "would run" in lines[2]


def test_sweep_time_left_falls_while_a_run_trains(tmp_path):
    """The sweep's estimate counts the running run's time as spent, not as a slower mean per finished run (it used
    to grow from 24 to 30 min while one run trained), and never says less than the foreground run itself needs."""
    now = [0.0]
    progress = SweepProgress(4, echo=lambda line: None, live=LiveLine(io.StringIO()), clock=lambda: now[0])
    run = types.SimpleNamespace(label="lora toy lr=0.001 seed=1", output_dir=tmp_path)
    assert progress.left() is None
    for finish_at in (100.0, 200.0):  # two runs of 100 s each
        now[0] = finish_at
        progress.finished(1, 4, run, False, "failed", 100.0)
    assert progress.left() == pytest.approx(200.0)
    now[0] = 240.0  # 40 s into the third run: its 60 s and the fourth's 100 s
    assert progress.left() == pytest.approx(160.0)
    now[0] = 290.0
    assert progress.left() == pytest.approx(110.0)
    progress.update(run, RunProgress(step=9, max_steps=10, loss=0.5, elapsed_s=90.0, left_s=130.0, updated=290.0))
    assert progress.left() == pytest.approx(130.0)  # a run slower than the mean: what it reports it still needs
    now[0] = 500.0
    progress.update(run, RunProgress(step=10, max_steps=10, loss=0.5, elapsed_s=300.0, left_s=0.0, updated=500.0))
    assert progress.left() == 0.0
    now[0] = 520.0
    progress.finished(3, 4, run, False, "failed", 300.0)
    assert progress.left() == pytest.approx(520.0 / 3)  # the mean over the 3 finished runs, one left


def test_sweep_with_subprocess_launcher_and_k_shot(assets, tmp_path, capsys):
    out = tmp_path / "runs"
    spec = spec_for(assets, out, methods=["lora"], learning_rates=[1e-3], seeds=[7], k_shots=[3], launcher="subprocess")
    sweep_file = tmp_path / "sweep.json"
    sweep_file.write_text(json.dumps(spec))
    assert cli.main(["sweep", str(sweep_file), "--report"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "sweep: 1/1 runs done, 0 failed, 0 s left" in captured.err
    results = json.loads((out / "toy" / "lora" / "k3" / "lr0.001" / "seed7" / "results.json").read_text())
    assert results["k_shot"] == 3 and results["num_examples"]["train"] == 6 and results["seed"] == 7
    assert results["launcher"] == "subprocess" and results["node"]
    assert "[1/1] lora toy lr=0.001 seed=7 k=3: dev" in printed and "## k = 3 per label" in printed
    assert (out / "report.md").is_file() and (out / "report.png").read_bytes()[:4] == b"\x89PNG"


def _fake_result(
    root: Path,
    method: str,
    task: str,
    lr: float,
    seed: int,
    dev: float,
    test: float,
    share: float,
    k: int | None = None,
    stored: float | None = None,
) -> None:
    folder = root / task / method / f"lr{lr:g}" / f"seed{seed}"
    folder.mkdir(parents=True)
    payload = {
        "method": method,
        "task": task,
        "learning_rate": lr,
        "seed": seed,
        "k_shot": k,
        "model": "m",
        "dev": {"score": dev},
        "test": {"score": test},
        "trainable_percent": share,
    }
    if stored is not None:
        payload["stored_percent"] = stored
    (folder / "results.json").write_text(json.dumps(payload))


def test_report_chooses_the_learning_rate_on_dev_and_averages_seeds(tmp_path):
    runs = tmp_path / "runs"
    # lora: lr 1e-3 is better on dev (mean 80 vs 70) although its test scores are lower than lr 1e-2's
    for seed, (dev, test) in enumerate([(79, 60), (81, 64)], 1):
        _fake_result(runs, "lora", "sst2", 1e-3, seed, dev, test, 0.5)
    for seed, (dev, test) in enumerate([(70, 90), (70, 92)], 1):
        _fake_result(runs, "lora", "sst2", 1e-2, seed, dev, test, 0.5)
    for seed, test in enumerate([70.0, 74.0], 1):
        _fake_result(runs, "lora", "rte", 1e-3, seed, 50, test, 0.5)
    for seed, test in enumerate([88.0, 90.0], 1):
        _fake_result(runs, "full", "sst2", 2e-5, seed, 85, test, 100.0)
    _fake_result(runs / "k16", "lora", "sst2", 1e-3, 1, 50, 50, 0.5, k=16)

    table = report_mod.summarise(report_mod.collect(runs))
    cell = table["full data"][("lora", "sst2")]
    assert cell.best_lr == 1e-3 and cell.test_scores == [60, 64]
    assert cell.mean == 62 and cell.std == pytest.approx(statistics.stdev([60, 64]))
    md_path, png_path, text = report_mod.write_report(runs)
    # sst2, rte, average; no stored counts in these results; bold: the task's best
    assert "| lora | 0.5% | – | 62.0 ± 2.8 | **72.0 ± 2.8** | 67.0 |" in text
    assert "| full | 100.0% | – | **89.0 ± 1.4** | – | – |" in text  # no rte run: no average
    assert "## k = 16 per label" in text and "| lora | 0.001 | 0.001 |" in text
    assert md_path.read_text().strip() == text.strip() and png_path.read_bytes()[:4] == b"\x89PNG"


def test_report_tells_trained_from_stored_and_marks_differences_within_noise(tmp_path):
    runs = tmp_path / "runs"
    scores = {
        "full": [80.0, 82.0, 84.0],  # the best mean
        "lora": [79.0, 83.0, 82.0],  # within noise of it: the paired differences 1, -1, 2 straddle 0
        "rpt": [60.0, 61.0, 63.0],  # a consistent 20-point gap: beyond noise
    }
    shares = {"full": (100.0, 100.0), "lora": (0.5, 0.5), "rpt": (2.7, 0.02)}  # rpt trains an MLP it does not store
    for method, tests in scores.items():
        for seed, test in enumerate(tests, 1):
            _fake_result(runs, method, "sst2", 1e-3, seed, 50, test, shares[method][0], stored=shares[method][1])
    _fake_result(runs, "bitfit", "sst2", 1e-3, 1, 50, 81.0, 0.1, stored=0.1)  # one seed: noise unknown
    text = report_mod.markdown(report_mod.collect(runs))
    assert "| method | trained | stored | sst2 | avg |" in text
    assert "| full | 100.0% | 100.0% | **82.0 ± 2.0** | 82.0 |" in text
    assert "| lora | 0.5% | 0.5% | 81.3 ± 2.1 ≈ | 81.3 |" in text
    assert "| rpt | 2.7% | 0.02% | 61.3 ± 1.5 | 61.3 |" in text
    assert "| bitfit | 0.1% | 0.1% | 81.0 ± 0.0 ? | 81.0 |" in text
    assert "paired t-test over the seeds both ran, p >= 0.05" in text
    report_mod.plot(report_mod.collect(runs), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_report_of_an_empty_folder_is_an_input_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    assert "no results.json under" in capsys.readouterr().err


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_is_reported_after_the_first_step_then_every_30_s_and_at_the_end(tmp_path):
    from transformers import TrainerState

    from peftlab.runner.progress import ProgressCallback, read_progress

    clock, seen, losses = _Clock(), [], [0.9, 0.8]
    callback = ProgressCallback(tmp_path, lambda: losses.pop(0) if losses else None, seen.append, 30, clock)
    state = TrainerState(max_steps=100)
    callback.on_train_begin(None, state, None)
    for step in range(1, 101):
        clock.now = step * 7.0  # 7 s per step: a report every 5 steps (35 s), the first after step 1
        state.global_step = step
        callback.on_step_end(None, state, None)
    assert [p.step for p in seen] == [*range(1, 100, 5), 100]
    assert seen[0].text() == "step 1/100, loss 0.9000, 11 min 33 s left"
    assert seen[1].loss == 0.8 and seen[2].text() == "step 11/100, loss ?, 10 min 23 s left" and seen[-1].left_s == 0
    assert read_progress(tmp_path) == seen[-1]
    reported = len(seen)
    callback.on_train_end(None, state, None)  # the last step was reported already
    state.global_step, state.max_steps = 3, 3  # a second training (XPrompt's stages), stopped early at its end
    callback.on_train_begin(None, state, None)
    callback.on_train_end(None, state, None)
    assert len(seen) == reported + 1 and seen[-1].step == 3


def test_live_line_rewrites_itself_on_a_terminal_and_prints_lines_elsewhere():
    from peftlab.runner.progress import LiveLine

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, log = Terminal(), io.StringIO()
    for stream in (terminal, log):
        line = LiveLine(stream)
        line.show("a")
        line.show("b")
        line.show("b")
        line.clear()
        line.close()
    assert terminal.getvalue() == "\ra\x1b[K\rb\x1b[K\rb\x1b[K\r\x1b[K\n"
    assert log.getvalue() == "a\nb\n"


@pytest.mark.parametrize("sweep_file", sorted((Path(__file__).parents[1] / "benchmarks" / "sweeps").glob("*.yaml")))
def test_shipped_sweep_files_parse(sweep_file, tmp_path, capsys):
    """The README's `peftlab sweep benchmarks/sweeps/...` commands stay runnable: every run's arguments parse (and
    --output_dir moves a sweep file's runs)."""
    assert cli.main(["sweep", str(sweep_file), "--output_dir", str(tmp_path), "--dry_run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(f"would run in {tmp_path}" in line for line in lines)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("kept")
    assert cli.main(["sweep", str(sweep_file), "--output_dir", str(a_file)]) == 2
    assert f"{a_file} is a file, not a folder" in capsys.readouterr().err
    assert a_file.read_text() == "kept"


def test_a_finished_run_trained_otherwise_is_refused_not_reused(assets, tmp_path):
    """A finished run is reused only if it was trained as the sweep would train it now (sweep file and recipe)."""
    out = tmp_path / "runs"
    spec = spec_for(assets, out, methods=["full"], learning_rates=[1e-3], seeds=[1])
    assert run_sweep(spec, echo=lambda line: None) == []
    results = out / "toy" / "full" / "full" / "lr0.001" / "seed1" / "results.json"
    saved = results.read_text()
    lines: list[str] = []
    assert run_sweep(spec, echo=lines.append) == [] and lines == [
        "[1/1] full toy lr=0.001 seed=1 full: skipped (results.json exists)"
    ]
    changed = {**spec, "args": {**spec["args"], "weight_decay": 0.1}}  # the sweep file changed
    with pytest.raises(
        InputError, match=r"1 finished run\(s\) were trained with other settings.*weight_decay 0\.0 -> 0\.1"
    ):
        run_sweep(changed, echo=lambda line: None)
    # a run made by a peftlab whose recipe differed (BitFit's schedule changed from linear to constant)
    record = json.loads(saved)
    record["hyperparameters"]["lr_scheduler_type"] = "SchedulerType.CONSTANT"
    results.write_text(json.dumps(record))
    with pytest.raises(InputError, match="lr_scheduler_type 'SchedulerType.CONSTANT' -> 'SchedulerType.LINEAR'"):
        run_sweep(spec, echo=lambda line: None, dry_run=True)
    assert json.loads(results.read_text()) == record  # nothing saved is touched
