"""Checks peft adapters written by deltatune's save_peft with Python peft itself: each one
loads with PeftModel.from_pretrained onto the base model its adapter_config.json names, and
runs the batch the C++ side recorded; the outputs must equal deltatune's within 1e-5.

    python tools/peft_roundtrip.py build/peft_export [--golden build/golden]

The folder is what the C++ test case [peft_export] writes (ctest peft_export runs it first):
cases.json (the case names, written last), and per case <case>/ (the adapter) and
<case>.safetensors (input_ids, attention_mask, labels or R, and deltatune's output: T5's
logits, BERT's last_hidden_state). Exits 1, naming the case, when anything is missing or differs.
"""
import argparse
import json
import sys
from pathlib import Path

TOLERANCE = 1e-5


def check_case(folder: Path, case: str) -> str:
    """An empty string when peft computes what deltatune did, else what went wrong."""
    import torch
    from peft import PeftConfig, PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForSeq2SeqLM

    adapter, io_file = folder / case, folder / f"{case}.safetensors"
    for path in (adapter / "adapter_config.json", adapter / "adapter_model.safetensors", io_file):
        if not path.exists():
            return f"{path} is missing"
    config = PeftConfig.from_pretrained(adapter)
    loader = AutoModelForSeq2SeqLM if config.task_type == "SEQ_2_SEQ_LM" else AutoModel
    model = PeftModel.from_pretrained(loader.from_pretrained(config.base_model_name_or_path), adapter).eval()
    io = load_file(io_file)
    with torch.no_grad():
        if "labels" in io:
            out = model(input_ids=io["input_ids"], attention_mask=io["attention_mask"], labels=io["labels"]).logits
        else:
            out = model(input_ids=io["input_ids"], attention_mask=io["attention_mask"]).last_hidden_state
    expected = io["output"]
    if out.shape != expected.shape:
        return f"peft's output is {tuple(out.shape)}, deltatune's {tuple(expected.shape)}"
    difference = (out - expected).abs().max().item()
    if not torch.allclose(out, expected, rtol=TOLERANCE, atol=TOLERANCE):
        return f"max |peft - deltatune| = {difference:.3g}, over {TOLERANCE}"
    print(f"peft_roundtrip: {case}: {config.peft_type.value} equal (max |difference| {difference:.2g})")
    return ""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--golden", type=Path, help="the golden fixture folder: its UNAVAILABLE means skip")
    args = parser.parse_args()
    if args.golden and (args.golden / "UNAVAILABLE").exists():
        print(f"peft_roundtrip: tests skipped: {(args.golden / 'UNAVAILABLE').read_text().strip()}")
        return 0
    manifest = args.folder / "cases.json"
    if not manifest.exists():
        print(f"peft_roundtrip: {manifest} is missing: run the C++ case first "
              f"(ctest -R peft_export, or deltatune_tests \"[peft_export]\")")
        return 1
    failures = [f"{case}: {why}" for case in json.loads(manifest.read_text()) if (why := check_case(args.folder, case))]
    for failure in failures:
        print(f"peft_roundtrip: FAILED {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
