"""XPrompt: importance scores (against brute force), pruning, rewinding, saving, the pipeline, bad input."""

import pytest
import torch
from peft import PeftModel, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file
from tiny import TASK_FAMILIES, load_base, loss_of, make_batch, outputs_of, save_tiny_base, train_steps

import peftlab
from peftlab import XPromptConfig
from peftlab.xprompt import importance_scores, prune, rewind, run, summary


def feature_loss(outputs, batch):
    """Per-example loss for FEATURE_EXTRACTION (no head, no loss of its own): the same target as tiny.loss_of."""
    first = outputs.last_hidden_state[:, 0]
    return (first - torch.linspace(-2.0, 2.0, first.shape[-1], dtype=first.dtype)).pow(2).mean(-1)


def build(tmp_path, task_type="SEQ_CLS", family="bert", n=8, pieces=4, **config_kwargs):
    base = save_tiny_base(tmp_path, task_type, family)
    config = XPromptConfig(task_type=task_type, num_virtual_tokens=n, num_pieces=pieces, **config_kwargs)
    return get_peft_model(load_base(base, task_type), config), base


def encoder_of(model):
    return model.prompt_encoder[model.active_adapter]


def brute_force_scores(model, batch, loss_fn=None):
    """The definition, one example at a time: autograd on explicit token and piece masks at 1, the model's own
    loss for that single example; absolute values averaged over the examples that have a loss."""
    config = model.active_peft_config
    prompt = encoder_of(model).effective_prompt().detach()
    n, d = prompt.shape
    k = config.num_pieces
    token_total = torch.zeros(n, dtype=torch.float64)
    piece_total = torch.zeros(n, k, dtype=torch.float64)
    count = 0
    model.eval()
    for b in range(batch["input_ids"].shape[0]):
        single = {key: value[b : b + 1] for key, value in batch.items()}
        gamma = torch.ones(n, dtype=prompt.dtype, requires_grad=True)
        zeta = torch.ones(n, k, dtype=prompt.dtype, requires_grad=True)
        masked = prompt * gamma[:, None] * zeta.repeat_interleave(d // k, dim=1)
        model.get_prompt = lambda batch_size, *args, masked=masked, **kwargs: masked.expand(batch_size, -1, -1)
        try:
            outputs = model(**single)
        finally:
            del model.get_prompt
        loss = loss_fn(outputs, single)[0] if loss_fn else outputs.loss
        if torch.isnan(loss):  # no target in this example: no loss of its own
            continue
        g_gamma, g_zeta = torch.autograd.grad(loss, (gamma, zeta))
        token_total += g_gamma.abs().double()
        piece_total += g_zeta.abs().double()
        count += 1
    return token_total / count, piece_total / count


def trained_model(tmp_path, task_type, family, steps=3):
    model, base = build(tmp_path, task_type, family)
    batch = make_batch(task_type)
    train_steps(model, batch, steps=steps)
    return model, base, batch


@pytest.mark.parametrize(("task_type", "family"), TASK_FAMILIES)
def test_scores_match_brute_force(tmp_path, task_type, family):
    model, _, batch = trained_model(tmp_path, task_type, family)
    model.double()
    # examples without a target have no loss of their own and must not count (weights of the others change)
    if task_type == "SEQ_CLS":
        batch["labels"][1] = -100
    if task_type in ("TOKEN_CLS", "CAUSAL_LM"):
        batch["labels"][0] = -100
    loss_fn = feature_loss if task_type == "FEATURE_EXTRACTION" else None
    # float64 model; transformers computes the causal-LM loss from float32-upcast logits even then, so a batch
    # and a single example round differently there (measured 1.6e-6 relative on LLaMA)
    rtol = 1e-5 if task_type == "CAUSAL_LM" else 1e-6
    encoder = encoder_of(model)
    for round_index in range(2):  # unpruned prompt, then a pruned one (fewer tokens, zero pieces)
        scores = importance_scores(model, [batch], loss_fn=loss_fn)
        tokens, pieces = brute_force_scores(model, batch, loss_fn)
        kept = encoder.kept_index
        torch.testing.assert_close(scores.tokens[kept], tokens, rtol=rtol, atol=1e-12)
        live = encoder.piece_mask[kept]
        torch.testing.assert_close(scores.pieces[kept][live], pieces[live], rtol=rtol, atol=1e-12)
        assert torch.isnan(scores.pieces[kept][~live]).all()
        assert scores.num_examples == (3 if task_type in ("SEQ_CLS", "TOKEN_CLS", "CAUSAL_LM") else 4)
        if round_index == 0:
            prune(model, scores, token_ratio=0.25, piece_ratio=0.25)
            assert torch.isnan(importance_scores(model, [batch], loss_fn=loss_fn).tokens[~encoder.token_mask]).all()


def test_scores_average_over_batches_and_normalize(tmp_path):
    model, _, batch = trained_model(tmp_path, "TOKEN_CLS", "bert")
    model.double()
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    whole = importance_scores(model, [batch])
    split = importance_scores(model, halves)
    torch.testing.assert_close(split.tokens, whole.tokens, rtol=1e-9, atol=0)
    normalized = importance_scores(model, halves, normalize=True)
    torch.testing.assert_close(normalized.tokens, whole.tokens / whole.tokens.norm(), rtol=1e-9, atol=0)
    row_norms = whole.pieces.norm(dim=1, keepdim=True)
    torch.testing.assert_close(normalized.pieces, whole.pieces / row_norms, rtol=1e-9, atol=0)


def test_scoring_has_no_side_effects_and_uses_eval_mode(tmp_path):
    model, _, batch = trained_model(tmp_path, "SEQ_CLS", "bert")
    model.train()
    model.base_model.bert.encoder.layer[0].eval()  # a mixed state must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    for p in model.parameters():
        p.grad = None
    first = importance_scores(model, [batch])
    second = importance_scores(model, [batch])
    torch.testing.assert_close(first.tokens, second.tokens, rtol=0, atol=0)  # no dropout: deterministic
    with_dropout = importance_scores(model, [batch], train_mode=True)
    assert not torch.allclose(with_dropout.tokens, first.tokens)
    assert {name: m.training for name, m in model.named_modules()} == modes
    for name, p in model.named_parameters():
        assert p.grad is None, name
        assert torch.equal(p, before[name]), name
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert "get_prompt" not in model.__dict__


def test_prune_removes_lowest_tokens_and_pieces(tmp_path):
    model, _, batch = trained_model(tmp_path, "TOKEN_CLS", "bert")
    encoder = encoder_of(model)
    scores = importance_scores(model, [batch])
    result = prune(model, scores, token_ratio=0.25, piece_ratio=0.5)
    lowest_tokens = set(torch.argsort(scores.tokens)[:2].tolist())
    assert set(torch.nonzero(~encoder.token_mask).flatten().tolist()) == lowest_tokens
    live_scores = scores.pieces[encoder.token_mask[:, None] & encoder.piece_mask]
    dropped_scores = scores.pieces[encoder.token_mask[:, None] & ~encoder.piece_mask]
    assert dropped_scores.numel() == 12 and live_scores.numel() == 12
    assert dropped_scores.max() <= live_scores.min()
    assert (result.num_tokens, result.num_pieces_kept, result.num_pieces_total) == (6, 12, 32)
    assert result.fraction_kept == pytest.approx(12 / 32)
    # the prompt is shorter: config, peft's virtual-token ids, and the output sequence
    assert model.peft_config["default"].num_virtual_tokens == 6
    assert model.prompt_tokens["default"].tolist() == list(range(6))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape[1] == 6 + batch["input_ids"].shape[1]
    # second round: scores are recomputed on the surviving prompt; stale ones are refused
    with pytest.raises(ValueError, match="recompute"):
        prune(model, scores, token_ratio=0.25, piece_ratio=0.0)
    second = prune(model, importance_scores(model, [batch]), token_ratio=0.5, piece_ratio=0.0)
    assert second.num_tokens == 3 and model.peft_config["default"].num_virtual_tokens == 3


def test_pruned_parts_stay_exactly_zero_through_retraining_with_weight_decay(tmp_path):
    model, _ = build(tmp_path)
    batch = make_batch("SEQ_CLS")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.05, weight_decay=0.5)
    model.train()
    for _ in range(3):  # stage 1 builds up Adam moments on every prompt entry
        loss_of(model(**batch)).backward()
        optimizer.step()
        optimizer.zero_grad()
    encoder = encoder_of(model)
    prune(model, importance_scores(model, [batch]), token_ratio=0.25, piece_ratio=0.5)
    pruned_full = ~encoder.element_mask()
    pruned_kept = encoder.kept_element_mask == 0
    model.train()
    for _ in range(5):  # keep the stale optimizer on purpose: its moments still push the pruned entries
        loss_of(model(**batch)).backward()
        grad = encoder.embedding.weight.grad
        assert torch.all(grad[pruned_full] == 0)
        assert grad[~pruned_full].abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
    assert torch.all(encoder.effective_prompt()[pruned_kept] == 0)
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved["prompt_embeddings"].shape == (6, 32)
    assert torch.all(saved["prompt_embeddings"][pruned_kept] == 0)


def test_rewind_restores_stage1_values_bitwise(tmp_path):
    model, _, batch = trained_model(tmp_path, "SEQ_CLS", "bert")
    encoder = encoder_of(model)
    stage1 = encoder.embedding.weight.detach().clone()
    prune(model, importance_scores(model, [batch]), token_ratio=0.25, piece_ratio=0.25)
    train_steps(model, batch, steps=3)
    assert not torch.equal(encoder.effective_prompt(), (stage1[encoder.kept_index] * encoder.kept_element_mask))
    prune(model, importance_scores(model, [batch]), token_ratio=0.2, piece_ratio=0.2)  # round 2: same snapshot
    rewind(model)
    keep = encoder.element_mask()
    weight = encoder.embedding.weight.detach()
    assert torch.equal(weight[keep], stage1[keep])
    assert torch.equal(weight[~keep], torch.zeros_like(weight[~keep]))
    assert torch.equal(encoder.stage1_prompt, stage1)


def test_resume_training_state_in_another_model(tmp_path):
    """load_adapter(..., is_trainable=True) into a fresh trainable model (what Trainer's resume does) restores
    masks, the shorter prompt and the stage-1 snapshot: outputs, further pruning and rewinding continue exactly."""
    model, base, batch = trained_model(tmp_path, "SEQ_CLS", "bert")
    prune(model, importance_scores(model, [batch]), token_ratio=0.25, piece_ratio=0.25)
    train_steps(model, batch, steps=2)
    model.save_pretrained(tmp_path / "adapter")
    resumed = get_peft_model(
        load_base(base, "SEQ_CLS"), XPromptConfig(task_type="SEQ_CLS", num_virtual_tokens=8, num_pieces=4)
    )
    resumed.load_adapter(tmp_path / "adapter", "default", is_trainable=True)
    assert resumed.peft_config["default"].num_virtual_tokens == 6
    for name in ("token_mask", "piece_mask", "stage1_prompt", "has_stage1"):
        assert torch.equal(getattr(encoder_of(resumed), name), getattr(encoder_of(model), name)), name
    expected, got = outputs_of(model, "SEQ_CLS", batch), outputs_of(resumed, "SEQ_CLS", batch)
    torch.testing.assert_close(got["logits"], expected["logits"], rtol=0, atol=0)
    for m in (model, resumed):
        prune(m, importance_scores(m, [batch]), token_ratio=0.2, piece_ratio=0.2)
        rewind(m)
    torch.testing.assert_close(
        encoder_of(resumed).effective_prompt(), encoder_of(model).effective_prompt(), rtol=0, atol=0
    )
    assert resumed.peft_config["default"].num_virtual_tokens == model.peft_config["default"].num_virtual_tokens


def test_run_pipeline_selects_best_pair_on_dev(tmp_path):
    model, _ = build(tmp_path)
    batch, dev = make_batch("SEQ_CLS", seed=1), make_batch("SEQ_CLS", seed=2)
    encoder = encoder_of(model)
    head = model.base_model.classifier.modules_to_save["default"].weight
    starts, score_passes, after_stage1 = [], [], {}

    def train(m):
        starts.append(
            {
                "prompt": encoder.effective_prompt().detach().clone(),
                "head": head.detach().clone(),
                "keep": encoder.element_mask().clone(),
                "tokens": encoder.token_mask.clone(),
            }
        )
        train_steps(m, batch, steps=2, lr=0.05)
        after_stage1.setdefault("prompt", encoder.embedding.weight.detach().clone())
        after_stage1.setdefault("head", head.detach().clone())

    def evaluate(m):
        m.eval()
        with torch.no_grad():
            return -m(**dev).loss.item()

    class ScoreData:  # records each pass over the scoring data
        def __iter__(self):
            score_passes.append(len(starts))
            return iter([batch])

    pairs = [(0.25, 0.25), (0.5, 0.0)]
    result = run(model, train=train, evaluate=evaluate, score_data=ScoreData(), ratio_pairs=pairs, num_rounds=2)
    assert len(starts) == 1 + len(pairs) * 2
    # scores recomputed before every round's prune, except the first round of the second pair: it prunes the same
    # stage-1 state as the first pair's, so it reuses those scores (prune refuses scores of other masks)
    assert score_passes == [1, 2, 4]
    first_round = [starts[1]["tokens"], starts[3]["tokens"]]  # 8 -> 6 and 8 -> 4 tokens by the same scores
    assert not (first_round[1] & ~first_round[0]).any()  # so the 4 kept are among the 6
    for start in starts[1:]:  # every retrain starts from the rewound stage-1 prompt and head
        expected = (after_stage1["prompt"] * start["keep"])[start["tokens"]]
        assert torch.equal(start["prompt"], expected)
        assert torch.equal(start["head"], after_stage1["head"])
    assert torch.equal(encoder.stage1_prompt, after_stage1["prompt"])
    assert [(t.token_ratio, t.piece_ratio) for t in result.trials] == pairs
    assert [t.summary.num_tokens for t in result.trials] == [4, 2]  # 8 -> 6 -> 4 and 8 -> 4 -> 2
    assert result.best.dev_metric == max(t.dev_metric for t in result.trials)
    assert summary(model) == result.best.summary
    assert model.peft_config["default"].num_virtual_tokens == result.best.summary.num_tokens
    assert evaluate(model) == pytest.approx(result.best.dev_metric, abs=1e-6)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="num_pieces=5 does not divide the hidden size token_dim=32"):
        build(tmp_path, pieces=5)
    with pytest.raises(ValueError, match="num_pieces=3 does not divide"):
        XPromptConfig(task_type="SEQ_CLS", num_virtual_tokens=4, num_pieces=3, token_dim=32)
    with pytest.raises(ValueError, match="num_pieces must be a positive integer"):
        XPromptConfig(task_type="SEQ_CLS", num_virtual_tokens=4, num_pieces=0)
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        XPromptConfig(task_type="SEQ_CLS", num_virtual_tokens=0)
    with pytest.raises(ValueError, match="num_transformer_submodules must be 1"):
        XPromptConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4, num_transformer_submodules=2)
    model, base = build(tmp_path, n=2)
    batch = make_batch("SEQ_CLS")
    scores = importance_scores(model, [batch])
    for field, bad in (("token_ratio", 1.0), ("token_ratio", -0.1), ("piece_ratio", 1.5), ("piece_ratio", "0.2")):
        kwargs = {"token_ratio": 0.0, "piece_ratio": 0.0, field: bad}
        with pytest.raises(ValueError, match=f"{field} must be a number in \\[0, 1\\)"):
            prune(model, scores, **kwargs)
    with pytest.raises(ValueError, match="would prune every one of the 2 remaining tokens"):
        prune(model, scores, token_ratio=0.9, piece_ratio=0.0)
    with pytest.raises(ValueError, match="nothing to rewind"):
        rewind(model)
    with pytest.raises(ValueError, match="dataloader is empty"):
        importance_scores(model, [])
    with pytest.raises(ValueError, match="no example with a loss"):
        importance_scores(model, iter([{**batch, "labels": torch.full((4,), -100)}]))
    with pytest.raises(ValueError, match="FEATURE_EXTRACTION.*pass loss_fn"):
        importance_scores(build(tmp_path, "FEATURE_EXTRACTION")[0], [batch])
    stock = get_peft_model(load_base(base, "SEQ_CLS"), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
    for call in (lambda m: importance_scores(m, [batch]), lambda m: prune(m, scores, 0.1, 0.1), rewind):
        with pytest.raises(ValueError, match="not an XPrompt adapter"):
            call(stock)
        with pytest.raises(ValueError, match="needs a peft.PeftModel"):
            call(load_base(base, "SEQ_CLS"))
    state = {"train": 0}

    def train(m):
        state["train"] += 1

    kwargs = {"train": train, "evaluate": lambda m: 0.0, "score_data": [batch]}
    with pytest.raises(ValueError, match="token_ratio=0.5 prunes every token within num_rounds=2"):
        run(model, ratio_pairs=[(0.5, 0.0)], num_rounds=2, **kwargs)
    with pytest.raises(ValueError, match="piece_ratio must be a number"):
        run(model, ratio_pairs=[(0.1, 1.0)], **kwargs)
    with pytest.raises(ValueError, match="ratio_pairs is empty"):
        run(model, ratio_pairs=[], **kwargs)
    with pytest.raises(ValueError, match="score_data is empty"):
        run(model, ratio_pairs=[(0.1, 0.1)], train=train, evaluate=lambda m: 0.0, score_data=[])
    assert state["train"] == 0  # every check came before any training


def test_loaded_adapter_is_inference_only_and_shape_mismatch_is_named(tmp_path):
    model, base, batch = trained_model(tmp_path, "SEQ_CLS", "bert")
    prune(model, importance_scores(model, [batch]), token_ratio=0.25, piece_ratio=0.25)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_base(base, "SEQ_CLS"), tmp_path / "adapter")
    assert summary(loaded) == summary(model)
    importance_scores(loaded, [batch])  # scoring a loaded model works
    with pytest.raises(ValueError, match="loaded for inference"):
        prune(loaded, importance_scores(loaded, [batch]), 0.1, 0.1)
    other = get_peft_model(
        load_base(base, "SEQ_CLS"), XPromptConfig(task_type="SEQ_CLS", num_virtual_tokens=10, num_pieces=4)
    )
    with pytest.raises(ValueError, match=r"token mask has shape \(8,\) but this model expects \(10,\)"):
        other.load_adapter(tmp_path / "adapter", "default", is_trainable=True)


def test_export_keeps_only_survivors_and_the_head(tmp_path):
    model, _, batch = trained_model(tmp_path, "SEQ_CLS", "bert")
    prune(model, importance_scores(model, [batch]), token_ratio=0.5, piece_ratio=0.0)
    path = peftlab.export_adapter(model, tmp_path / "stock")
    saved = load_file(path / "adapter_model.safetensors")
    assert saved["prompt_embeddings"].shape == (4, 32)
    assert not any(key.startswith("xprompt_") for key in saved)
    assert any("classifier" in key for key in saved)


def test_run_with_transformers_trainer(tmp_path):
    """The pipeline drives an ordinary transformers.Trainer (fresh optimizer per stage); Trainer checkpoints of
    the pruned model carry the masks."""
    from transformers import Trainer, TrainingArguments

    model, _ = build(tmp_path)
    batch = make_batch("SEQ_CLS")
    examples = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )

    def train(m):
        Trainer(model=m, args=args, train_dataset=examples).train()

    def evaluate(m):
        m.eval()
        with torch.no_grad():
            return -m(**batch).loss.item()

    result = run(model, train=train, evaluate=evaluate, score_data=[batch], ratio_pairs=[(0.25, 0.5)])
    assert result.best.summary.num_tokens == 6
    trainer = Trainer(model=model, args=args, train_dataset=examples)
    trainer.save_model(str(tmp_path / "checkpoint"))
    saved = load_file(tmp_path / "checkpoint" / "adapter_model.safetensors")
    assert torch.equal(saved["xprompt_token_mask"], encoder_of(model).token_mask)
    assert saved["prompt_embeddings"].shape == (6, 32)
