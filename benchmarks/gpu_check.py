"""The CUDA checks, in one run that fits 10 minutes on a lent GPU machine (`benchmarks/gpu_check.sh` runs it there).

1. Every method in bfloat16 with sdpa attention on a SmolLM2-135M-shaped LLaMA (random weights from its config: the
   real weights do not fit the 64 MiB that travels to the machine): 20 AdamW steps on a fixed batch (finite loss that
   falls), greedy generation with and without the KV cache, and under `disable_adapter()` the base model's tokens.
2. Train-step time of each peftlab method against its stock peer (RPT and XPrompt vs PROMPT_TUNING, BitFit vs BEFT;
   UniPELT against LoRA, for scale: stock PEFT has no UniPELT), every candidate built in this one process and
   stepping in turns, so that load changes hit all alike.
3. One claim at the GPU budget (`peftlab reproduce --budget gpu --claims rpt-beats-prompt-tuning --tasks trec`, the
   real MiniLM and TREC) for the time that is left; its finished runs' results.json files come back, and a later
   call that carries them resumes where this one stopped.

    python benchmarks/gpu_check.py --out DIR [--deadline_s 540]      # on CUDA
    python benchmarks/gpu_check.py --out DIR --device cpu --tiny --skip_claim   # the same code, tiny, on CPU (tests)

Writes DIR/gpu_check.md; exits 1 if a check failed (an exception, a non-finite or non-falling loss).
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import interleaved  # noqa: E402

# SmolLM2-135M's architecture (HuggingFaceTB/SmolLM2-135M config.json)
SMOLLM2_135M = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}
TINY = {**SMOLLM2_135M, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
TINY.update(num_attention_heads=4, num_key_value_heads=2)
METHODS = ("full", "lora", "prompt_tuning", "residual_prompt_tuning", "xprompt", "bitfit", "beft", "unipelt")
PEERS = (
    ("residual_prompt_tuning", "prompt_tuning"),
    ("xprompt", "prompt_tuning"),
    ("bitfit", "beft"),
    ("unipelt", "lora"),
    ("lora", "full"),
)
PROMPT_METHODS = ("prompt_tuning", "residual_prompt_tuning", "xprompt")
LINEAR_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CLAIM = ("rpt-beats-prompt-tuning", "trec")


def peft_config(method: str):
    """The method's PEFT config for a causal LM (None: full fine-tuning)."""
    from peft import BeftConfig, LoraConfig, PromptTuningConfig

    from peftlab import BitFitConfig, ResidualPromptTuningConfig, UniPELTConfig, XPromptConfig

    task = {"task_type": "CAUSAL_LM"}
    return {
        "full": lambda: None,
        "lora": lambda: LoraConfig(**task, r=8, target_modules=["q_proj", "v_proj"]),
        "prompt_tuning": lambda: PromptTuningConfig(**task, num_virtual_tokens=10),
        "residual_prompt_tuning": lambda: ResidualPromptTuningConfig(**task, num_virtual_tokens=10),
        "xprompt": lambda: XPromptConfig(**task, num_virtual_tokens=10),
        "bitfit": lambda: BitFitConfig(**task),
        "beft": lambda: BeftConfig(**task, target_modules=LINEAR_LAYERS),
        "unipelt": lambda: UniPELTConfig(**task),
    }[method]()


def base_model(tiny: bool, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**(TINY if tiny else SMOLLM2_135M), attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def build(method: str, tiny: bool, device: str, batch_size: int = 8, seq_len: int = 128, dtype: str = "bfloat16"):
    """(model with exactly its trainable parameters requiring grad, one batch): the harness's builder."""
    from peft import get_peft_model

    model = base_model(tiny, device, getattr(torch, dtype))
    config = peft_config(method)
    if config is not None:
        model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (batch_size, seq_len), generator=g).to(device)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def greedy(model, prompt: torch.Tensor, use_cache: bool) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's logits (8 new tokens)."""
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=8,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_scores=True,
        )
    return out.sequences[0, prompt.shape[1] :].tolist(), [score[0].float() for score in out.scores]


def same_generation(a: tuple[list[int], list[torch.Tensor]], b: tuple[list[int], list[torch.Tensor]]) -> str:
    """ "yes", or where the tokens part and whether the logits' difference there exceeds the top-2 margin (a near
    tie that bf16 rounding flips) or not (a real difference)."""
    if a[0] == b[0]:
        return "yes"
    k = next(i for i, (x, y) in enumerate(zip(a[0], b[0], strict=True)) if x != y)
    delta = float((a[1][k] - b[1][k]).abs().max())
    top2 = a[1][k].topk(2).values
    margin = float(top2[0] - top2[1])
    kind = "near tie" if delta >= margin else "REAL"
    return f"no: token {k}, largest logit change {delta:.3g} vs top-2 margin {margin:.3g} ({kind})"


def check_method(method: str, tiny: bool, device: str, steps: int, dtype: str = "bfloat16") -> dict:
    """Train `steps` steps on one batch; generate cached/uncached; disabled adapter = base model's generation."""
    model, batch = build(method, tiny, device, batch_size=4, seq_len=64, dtype=dtype)
    prompt = batch["input_ids"][:1, :16]
    base = None
    if method != "full":
        with model.disable_adapter():
            base = greedy(model, prompt, use_cache=True)
    lr = 1e-1 if method in PROMPT_METHODS else 1e-3  # soft prompts want far larger steps
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    model.eval()
    row = {"method": method, "first loss": losses[0], "last loss": losses[-1]}
    finite = all(map(torch.isfinite, map(torch.tensor, losses)))
    row["trains"] = "ok" if finite and losses[-1] < losses[0] else "FAILED"
    row["cached = uncached"] = same_generation(greedy(model, prompt, True), greedy(model, prompt, False))
    if base is not None:
        with model.disable_adapter():
            row["disabled = base"] = same_generation(greedy(model, prompt, True), base)
    return row


def markdown_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.4f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speed(tiny: bool, device: str, steps: int) -> str:
    """Median step time of every candidate (one process, in turns) and each method's ratio to its peer."""
    candidates = {m: ("gpu_check:build", {"method": m, "tiny": tiny, "device": device}) for m in METHODS}
    times = interleaved(candidates, steps=steps, warmup=3, device=device)
    rows = [{"method": m, "step (ms)": times[m]} for m in METHODS]
    ratios = [{"ratio": f"{a} / {b}", "time": f"{times[a] / times[b]:.3f}x"} for a, b in PEERS]
    return markdown_table(rows) + "\n\n" + markdown_table(ratios)


def claim(out: Path, seconds: float, carried: Path | None) -> str:
    """Run the claim for `seconds` at most; bring its results.json files back as out/claims.tgz."""
    work = Path("/tmp/peftlab-gpu-claims")
    if carried is not None and carried.is_file():
        with tarfile.open(carried) as tar:
            tar.extractall(work, filter="data")
    cmd = [sys.executable, "-m", "peftlab", "reproduce", "--budget", "gpu", "--claims", CLAIM[0], "--tasks", CLAIM[1]]
    cmd += ["--output_dir", str(work)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(seconds, 1))
        status = f"finished (exit {done.returncode})\n\n{done.stdout[-4000:]}{done.stderr[-2000:]}"
    except subprocess.TimeoutExpired:
        status = "stopped at the deadline: a later call that carries claims.tgz resumes"
    results = sorted(work.rglob("results.json")) + sorted(work.glob("claims.md"))
    with tarfile.open(out / "claims.tgz", "w:gz") as tar:
        for path in results:
            tar.add(path, arcname=str(path.relative_to(work)))
    return f"{len(results)} files in claims.tgz; {status}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the script itself, on CPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="of check 1")
    parser.add_argument("--skip_claim", action="store_true")
    parser.add_argument("--claims_carried", type=Path, help="claims.tgz of an earlier call, to resume")
    parser.add_argument("--deadline_s", type=float, default=540.0, help="stop the claim this long after the start")
    args = parser.parse_args()
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    report = io.StringIO()
    if args.device == "cuda":
        report.write(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}\n\n")
    import peft
    import transformers

    report.write(f"transformers {transformers.__version__}, peft {peft.__version__}\n\n## 1. {args.dtype} + sdpa\n\n")
    rows, failed = [], False
    for method in METHODS:
        try:
            rows.append(check_method(method, args.tiny, args.device, args.steps, args.dtype))
        except Exception:  # one method's failure must not hide the others' results
            rows.append({"method": method, "trains": "FAILED", "error": traceback.format_exc(limit=3)[-300:]})
        failed |= rows[-1]["trains"] == "FAILED" or any("REAL" in str(v) for v in rows[-1].values())
        print(rows[-1], flush=True)
    report.write(markdown_table(rows) + "\n\n## 2. step time against the stock peers (bf16, sdpa)\n\n")
    report.write(speed(args.tiny, args.device, steps=max(5, args.steps)) + "\n\n")
    if not args.skip_claim:
        left = args.deadline_s - (time.monotonic() - start)
        report.write(f"## 3. {CLAIM[0]} on {CLAIM[1]}, budget gpu\n\n{claim(args.out, left, args.claims_carried)}\n")
    (args.out / "gpu_check.md").write_text(report.getvalue())
    print(report.getvalue())
    print(f"total {time.monotonic() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
