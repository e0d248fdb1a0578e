"""XPrompt on every task type: train -> score -> prune -> rewind -> retrain, then save, export and reload in a fresh
process (PeftModel.from_pretrained, AutoPeftModelFor*, and the stock export without peftlab): identical outputs and
greedy generations, and the masks come back. Two child processes in all (tiny.outputs_in_one_fresh_process): one
with peftlab for every XPrompt load, one without it for every stock export.
"""

import torch
from peft import get_peft_model
from tiny import (
    TASK_FAMILIES,
    assert_same_outputs,
    load_base,
    loss_of,
    make_batch,
    outputs_in_one_fresh_process,
    outputs_of,
    save_tiny_base,
    train_steps,
)

import peftlab
from peftlab import XPromptConfig
from peftlab.xprompt import importance_scores, prune, rewind


def _feature_loss(outputs, batch):
    first = outputs.last_hidden_state[:, 0]
    return (first - torch.linspace(-2.0, 2.0, first.shape[-1])).pow(2).mean(-1)


@torch.no_grad()
def _eval_loss(model, batch):
    model.eval()
    return loss_of(model(**batch)).item()


def test_every_task_type_round_trips_in_a_fresh_process(tmp_path):
    cases, peftlab_jobs, stock_jobs = [], [], []
    for task_type, family in TASK_FAMILIES:
        folder = tmp_path / f"{family}-{task_type.lower()}"
        folder.mkdir()
        base = save_tiny_base(folder, task_type, family)
        model = get_peft_model(
            load_base(base, task_type), XPromptConfig(task_type=task_type, num_virtual_tokens=8, num_pieces=4)
        )
        batch = make_batch(task_type)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        start_loss = _eval_loss(model, batch)
        train_steps(model, batch, steps=4)
        assert _eval_loss(model, batch) < start_loss, (task_type, family)
        changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert changed and changed <= trainable, (task_type, family, changed - trainable)
        assert all(name.startswith("prompt_encoder.") or "modules_to_save" in name for name in trainable)

        loss_fn = _feature_loss if task_type == "FEATURE_EXTRACTION" else None
        prune(model, importance_scores(model, [batch], loss_fn=loss_fn), token_ratio=0.25, piece_ratio=0.25)
        rewind(model)
        train_steps(model, batch, steps=2)
        assert model.peft_config["default"].num_virtual_tokens == 6
        expected = outputs_of(model, task_type, batch)
        model.save_pretrained(folder / "adapter")
        peftlab.export_adapter(model, folder / "stock")
        encoder = model.prompt_encoder["default"]
        cases.append((task_type, family, expected, encoder))
        peftlab_jobs += [
            {
                "task_type": task_type,
                "batch": batch,
                "adapter": folder / "adapter",
                "base": base,
                "encoder_state": True,
            },
            {"task_type": task_type, "batch": batch, "adapter": folder / "adapter", "loader": "auto"},
        ]
        stock_jobs.append({"task_type": task_type, "batch": batch, "adapter": folder / "stock", "base": base})
    with_peftlab = outputs_in_one_fresh_process(tmp_path, peftlab_jobs)
    without_peftlab = outputs_in_one_fresh_process(tmp_path, stock_jobs, import_peftlab=False)
    for index, (task_type, family, expected, encoder) in enumerate(cases):
        from_peft, from_auto = with_peftlab[2 * index : 2 * index + 2]
        loaded = from_peft.pop("encoder_state")
        for name in ("token_mask", "piece_mask", "stage1_prompt", "has_stage1"):
            assert torch.equal(loaded[name], getattr(encoder, name).cpu()), (task_type, family, name)
        assert torch.equal(loaded["embedding.weight"], encoder.effective_prompt().detach())
        assert int(loaded["token_mask"].sum()) == 6 and not bool(loaded["piece_mask"][loaded["token_mask"]].all())
        for got in (from_peft, from_auto, without_peftlab[index]):
            assert_same_outputs(expected, got)
