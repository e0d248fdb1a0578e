"""Child process of `tiny.outputs_in_fresh_process`: loads a saved adapter the way a user would and writes outputs."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    jobs = json.loads(sys.argv[1])
    jobs = jobs if isinstance(jobs, list) else [jobs]
    if jobs[0]["import_peftlab"]:
        import peftlab  # noqa: F401
    for args in jobs:
        run(args)


def run(args: dict) -> None:
    import peft
    from tiny import load_base, outputs_of

    task_type = args["task_type"]
    if args["loader"] == "peft":
        model = peft.PeftModel.from_pretrained(load_base(Path(args["base"]), task_type), args["adapter"])
    elif args["loader"] == "auto":
        auto_cls = {
            "SEQ_CLS": peft.AutoPeftModelForSequenceClassification,
            "TOKEN_CLS": peft.AutoPeftModelForTokenClassification,
            "QUESTION_ANS": peft.AutoPeftModelForQuestionAnswering,
            "FEATURE_EXTRACTION": peft.AutoPeftModelForFeatureExtraction,
            "CAUSAL_LM": peft.AutoPeftModelForCausalLM,
            "SEQ_2_SEQ_LM": peft.AutoPeftModelForSeq2SeqLM,
        }[task_type]
        model = auto_cls.from_pretrained(args["adapter"])
    else:
        model = load_base(Path(args["adapter"]), task_type)
    if not args["import_peftlab"]:
        assert "peftlab" not in sys.modules, "peftlab was imported although the check must run without it"
    batch = torch.load(args["batch"])
    torch.save(outputs_of(model, task_type, batch), args["out"])


if __name__ == "__main__":
    main()
