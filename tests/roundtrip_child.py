"""Child process of `tiny.outputs_in_fresh_process`: loads a saved adapter the way a user would and writes outputs."""

import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def outputs_of_job(job: dict, import_peftlab: bool) -> dict:
    import peft
    from tiny import load_base, outputs_of

    auto_classes = {
        "SEQ_CLS": peft.AutoPeftModelForSequenceClassification,
        "TOKEN_CLS": peft.AutoPeftModelForTokenClassification,
        "QUESTION_ANS": peft.AutoPeftModelForQuestionAnswering,
        "FEATURE_EXTRACTION": peft.AutoPeftModelForFeatureExtraction,
        "CAUSAL_LM": peft.AutoPeftModelForCausalLM,
        "SEQ_2_SEQ_LM": peft.AutoPeftModelForSeq2SeqLM,
    }
    task_type = job["task_type"]
    if job["loader"] == "peft":
        model = peft.PeftModel.from_pretrained(load_base(Path(job["base"]), task_type), job["adapter"])
    elif job["loader"] == "auto":
        model = auto_classes[task_type].from_pretrained(job["adapter"])
    else:
        model = load_base(Path(job["adapter"]), task_type)
    if not import_peftlab:
        assert "peftlab" not in sys.modules, "peftlab was imported although the check must run without it"
    # stock PEFT's cached generation of a prompt-learning adapter in a causal LM re-injects the prompt at every step
    # (peft 0.21.2 under transformers' `cache` rename; peftlab fixes it for its own types only, see README): a stock
    # load of an exported prompt adapter is compared by its uncached generation, which is stock PEFT's correct one
    stock_prompt = not import_peftlab and task_type == "CAUSAL_LM" and getattr(model, "peft_config", None)
    use_cache = not (stock_prompt and model.active_peft_config.is_prompt_learning)
    result = outputs_of(model, task_type, torch.load(job["batch"]), use_cache=use_cache)
    if job.get("encoder_state"):
        # the loaded prompt encoder's parameters and buffers (e.g. XPrompt's masks): what loading restored
        encoder = model.prompt_encoder[model.active_adapter]
        result["encoder_state"] = {k: v.cpu() for k, v in encoder.state_dict().items()}
    return result


def main() -> None:
    args = json.loads(sys.argv[1])
    if args["import_peftlab"]:
        import peftlab  # noqa: F401
    # one job (the keys of `outputs_of_job` at top level) or several loads in this same process ("jobs")
    for job in args.get("jobs", [args]):
        try:
            result = outputs_of_job(job, args["import_peftlab"])
        except Exception:
            if not args.get("catch_errors"):
                raise
            # one failing load must not hide the other jobs' results: the parent reports it for this job only
            result = {"error": traceback.format_exc()}
        torch.save(result, job["out"])


if __name__ == "__main__":
    main()
