"""Shared benchmark harness: train-step time and peak memory of several candidates, measured in the same run.

Each measurement runs in a fresh Python process (so peak memory is that candidate's alone), and the candidates
alternate round after round (so machine load drifts affect them alike). Results are medians over rounds; ratios are
printed against a named peer. A candidate is a builder `"module:function"` (module importable from this folder)
returning `(model, batch)`: the model with exactly the parameters to train requiring grad, and one batch of inputs.
"""

from __future__ import annotations

import importlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rss_peak_reset() -> None:
    # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM) of this process.
    Path("/proc/self/clear_refs").write_text("5")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _loss(output):
    if getattr(output, "loss", None) is not None:
        return output.loss
    return output.last_hidden_state.float().pow(2).mean()


def _build(builder: str, kwargs: dict):
    import torch

    torch.manual_seed(0)
    module_name, function_name = builder.split(":")
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return getattr(importlib.import_module(module_name), function_name)(**kwargs)


def _child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    model, batch = _build(spec["builder"], spec["kwargs"])
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model.to(device).train()
    batch = {k: v.to(device) for k, v in batch.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _status_kib("VmRSS") * 1024
        _rss_peak_reset()
    times = []
    for step in range(spec["warmup"] + spec["steps"]):
        start = time.perf_counter()
        _loss(model(**batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    return {
        "step_ms": 1000 * statistics.median(times),
        "peak_mb": (peak - base) / 2**20,
        "trainable": sum(p.numel() for p in params),
    }


def measure(
    builder: str,
    kwargs: dict | None = None,
    *,
    steps: int = 10,
    warmup: int = 3,
    threads: int = 2,
    python: str = sys.executable,
) -> dict:
    """One measurement of one candidate in a fresh process: median step time (ms) and peak memory increase (MiB)."""
    spec = {"builder": builder, "kwargs": kwargs or {}, "steps": steps, "warmup": warmup, "threads": threads}
    proc = subprocess.run([python, str(Path(__file__).resolve()), json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child for {builder} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(candidates: dict[str, tuple[str, dict]], *, rounds: int = 3, **measure_kwargs) -> dict[str, dict]:
    """Measure every candidate `rounds` times, alternating; returns the per-candidate medians."""
    samples: dict[str, list[dict]] = {name: [] for name in candidates}
    for round_index in range(rounds):
        for name, (builder, kwargs) in candidates.items():
            samples[name].append(measure(builder, kwargs, **measure_kwargs))
            print(f"  round {round_index + 1}/{rounds} {name}: {samples[name][-1]}", file=sys.stderr, flush=True)
    return {name: {key: statistics.median(s[key] for s in runs) for key in runs[0]} for name, runs in samples.items()}


def interleaved(
    candidates: dict[str, tuple[str, dict]], *, steps: int = 20, warmup: int = 2, threads: int = 2, device: str = "cpu"
) -> dict[str, float]:
    """Median train-step time (ms) of every candidate, all built in THIS process and stepping in turns.

    Time only (peak memory needs the fresh processes of `compare`): on a shared machine fresh-process times can drift
    by 2x between rounds, which swamps a few-percent difference; here a load change hits every candidate alike. The
    order rotates every step so that no candidate always runs first. On CUDA each step ends with a synchronize.
    """
    import torch

    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    runs = {}
    for name, (builder, kwargs) in candidates.items():
        model, batch = _build(builder, kwargs)
        model.to(device).train()
        batch = {k: v.to(device) for k, v in batch.items()}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        runs[name] = (model, batch, optimizer)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for step in range(warmup + steps):
        for name in names[step % len(names) :] + names[: step % len(names)]:
            model, batch, optimizer = runs[name]
            sync()
            start = time.perf_counter()
            _loss(model(**batch)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def print_table(results: dict[str, dict], pairs: list[tuple[str, str]]) -> str:
    """Print (and return) a Markdown table of the medians and the time/memory ratios of each (candidate, peer)."""
    lines = ["| method | step (ms) | peak memory (MiB) | trainable params |", "|---|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['step_ms']:.1f} | {r['peak_mb']:.1f} | {int(r['trainable']):,} |")
    lines += ["", "| ratio | time | peak memory |", "|---|---:|---:|"]
    for name, peer in pairs:
        a, b = results[name], results[peer]
        lines.append(f"| {name} / {peer} | {a['step_ms'] / b['step_ms']:.3f}x | {a['peak_mb'] / b['peak_mb']:.3f}x |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
