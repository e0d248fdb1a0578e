"""Child process of `tiny.outputs_in_fresh_process`: loads a saved adapter the way a user would and writes outputs."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    args = json.loads(sys.argv[1])
    if args["import_peftlab"]:
        import peftlab  # noqa: F401
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
    # one job (the keys below at top level) or several loads in this same process ("jobs")
    for job in args.get("jobs", [args]):
        task_type = job["task_type"]
        if job["loader"] == "peft":
            model = peft.PeftModel.from_pretrained(load_base(Path(job["base"]), task_type), job["adapter"])
        elif job["loader"] == "auto":
            model = auto_classes[task_type].from_pretrained(job["adapter"])
        else:
            model = load_base(Path(job["adapter"]), task_type)
        if not args["import_peftlab"]:
            assert "peftlab" not in sys.modules, "peftlab was imported although the check must run without it"
        batch = torch.load(job["batch"])
        result = outputs_of(model, task_type, batch)
        if job.get("encoder_state"):
            # the loaded prompt encoder's parameters and buffers (e.g. XPrompt's masks): what loading restored
            encoder = model.prompt_encoder[model.active_adapter]
            result["encoder_state"] = {k: v.cpu() for k, v in encoder.state_dict().items()}
        torch.save(result, job["out"])


if __name__ == "__main__":
    main()
