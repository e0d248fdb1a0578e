"""`peftlab sweep --launcher ray` on a local Ray of 2 CPUs (one Ray for the module: starting it takes seconds)."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import ray
import torch
from runner_tiny import KILL, KILLED, save_model, sentiment_rows, write_csv
from safetensors.torch import load_file

from peftlab import cli
from peftlab.runner.errors import InputError
from peftlab.runner.sweep import expand, run_sweep

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def local_ray():
    """Workers inherit this environment: they import the tests' fault hook and this checkout's peftlab."""
    paths = [str(TESTS), str(TESTS.parent / "src"), os.environ.get("PYTHONPATH", "")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(paths))
        mp.setenv("HF_HUB_OFFLINE", "1")
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"worker_process_setup_hook": "runner_tiny.install_fault_hook"},
        )
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ray-assets")
    return {"bert": save_model(root, "bert"), "csv": write_csv(root / "train.csv", sentiment_rows(60))}


def spec_for(assets, out: Path, **overrides) -> dict:
    spec = {
        "output_dir": str(out),
        "args": {
            "model_name_or_path": str(assets["bert"]),
            "train_file": str(assets["csv"]),
            "max_steps": 6,
            "save_strategy": "steps",
            "save_steps": 3,
            "eval_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
            "per_device_train_batch_size": 8,
        },
        "methods": ["lora"],
        "tasks": ["toy"],
        "learning_rates": [1e-3, 1e-2],
        "seeds": [1, 2],
    }
    spec.update(overrides)
    return spec


def test_ray_sweep_with_a_killed_worker_ends_like_the_serial_sweep(local_ray, assets, tmp_path):
    """4 runs on 2 CPUs; one worker SIGKILLs itself after its first checkpoint: Ray retries that run, which
    resumes from the checkpoint, and every results.json and adapter equals the serial launcher's."""
    serial, parallel = tmp_path / "serial", tmp_path / "ray"
    assert run_sweep(spec_for(assets, serial), launcher="in_process", echo=lambda line: None) == []
    victim = expand(spec_for(assets, parallel))[1].output_dir
    victim.mkdir(parents=True)
    (victim / KILL).touch()
    lines: list[str] = []
    console = io.StringIO()
    failed = run_sweep(
        spec_for(assets, parallel, launcher="ray", ray={"max_retries": 1}), echo=lines.append, console=console
    )
    assert failed == [] and len(lines) == 4 and all(": dev " in line for line in lines), lines
    assert (victim / KILLED).exists() and not (victim / KILL).exists()  # the first attempt did die
    assert "sweep: 4/4 runs done, 0 failed" in console.getvalue()
    for run in expand(spec_for(assets, serial)):
        twin = parallel / run.output_dir.relative_to(serial)
        ref, res = (json.loads((d / "results.json").read_text()) for d in (run.output_dir, twin))
        assert ref["launcher"] == "in_process" and res["launcher"] == "ray"
        assert res["node"] == socket.gethostname() and res["ray_node_id"]
        if twin == victim:
            assert Path(res["resumed_from"]).name == "checkpoint-3"
        else:
            assert res["resumed_from"] is None
        for key in ("global_step", "dev", "test", "rank_checksums", "trainable_params", "num_examples"):
            assert res[key] == ref[key], (twin, key)
        a, b = load_file(run.output_dir / "adapter_model.safetensors"), load_file(twin / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ray_sweep_lists_a_failed_run_keeps_the_others_and_skips_finished_runs(local_ray, assets, tmp_path, capsys):
    out = tmp_path / "runs"
    spec = spec_for(
        assets,
        out,
        methods=["full", {"lora": {"learning_rates": [1e30], "warmup_steps": 0}}],  # no recipe warm-up: NaN at once
        learning_rates=[1e-3],
        seeds=[3],
    )
    sweep_file = tmp_path / "sweep.json"
    sweep_file.write_text(json.dumps(spec))
    argv = ["sweep", str(sweep_file), "--launcher", "ray", "--cpus_per_run", "1", "--gpus_per_run", "0"]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "1 run(s) failed: lora toy lr=1e+30 seed=3 full" in captured.err.splitlines()[-1]
    assert "FAILED" in captured.out and "loss became nan" in captured.out
    full = out / "toy" / "full" / "full" / "lr0.001" / "seed3"
    assert json.loads((full / "results.json").read_text())["launcher"] == "ray"
    assert cli.main(argv) == 1  # again: the finished run is skipped, the failed one tried again
    assert "[1/2] full toy lr=0.001 seed=3 full: skipped (results.json exists)" in capsys.readouterr().out


def test_ray_settings_are_checked_before_any_run(assets, tmp_path):
    with pytest.raises(InputError, match="unknown ray setting 'gpus'; allowed: address, gpus_per_run"):
        run_sweep(spec_for(assets, tmp_path, launcher="ray", ray={"gpus": 1}))
    with pytest.raises(InputError, match="ray cpus_per_run -1 is not allowed"):
        run_sweep(spec_for(assets, tmp_path, launcher="ray"), ray_options={"cpus_per_run": -1})
    assert not any(tmp_path.iterdir())


def test_missing_ray_is_one_line_naming_the_extra(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    sweep_file = tmp_path / "sweep.json"
    sweep_file.write_text(json.dumps(spec_for(assets, tmp_path / "runs", launcher="ray")))
    assert cli.main(["sweep", str(sweep_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["peftlab sweep: error: the ray launcher needs Ray, an optional extra: pip install 'peftlab[ray]'"]
    assert not (tmp_path / "runs").exists()
