"""Checks that adapters written by deltatune (formats/adapters.hpp) load in the adapters
library itself and give the same outputs there.

The C++ test "adapters' whole-model adapters load and match its logits and gradients"
(tests/formats/adapters_test.cpp) loads adapters' own fixtures, changes their weights, and
writes with save_adapters, per backbone (t5, bert) and case:
    <saved>/<model>/<case>/              adapter_config.json, adapter.safetensors
    <saved>/<model>/<case>.safetensors   the logits deltatune computed with it
This script rebuilds each backbone from the golden fixture (tools/golden/adapters_models.py,
<golden>/<model>/hf and io.safetensors), runs adapters.init, load_adapter(dir,
use_safetensors=True), and requires: every tensor of the file lands in the model, the model
has no adapter tensor the file lacks, and the logits equal deltatune's within 1e-5.
A guard, printed where used: should adapters skip a shared PHM rule of a model that is its
own base model (T5ForConditionalGeneration; its save filter wants ".shared_parameters.<name>."
and the key is "shared_parameters.<name>.phm_rule"), the script copies it in and says so.
ctest runs it after that C++ test (fixture adapters_roundtrip); anyone can rerun it:

    python tools/adapters_roundtrip.py --saved build/adapters_roundtrip --golden build/golden/adapters_models
"""
import argparse
import sys
from pathlib import Path

TOLERANCE = 1e-5


def check_case(model_class, golden, folder, case):
    import adapters
    import torch
    from safetensors.torch import load_file

    model = model_class.from_pretrained(golden / "hf").eval()
    adapters.init(model)
    name = model.load_adapter(str(folder / case), load_as=case, with_head=False, use_safetensors=True)
    model.set_active_adapters(name)
    params = dict(model.named_parameters())
    saved = load_file(str(folder / case / "adapter.safetensors"))
    notes = []
    for key in saved:
        if key.startswith(f"shared_parameters.{case}.") and key in params and not torch.equal(params[key], saved[key]):
            with torch.no_grad():
                params[key].copy_(saved[key])
            notes.append(f"set by hand (adapters 1.3.0 skips it): {key}")
    problems = [f"not loaded: {k}" for k, v in saved.items() if k not in params or not torch.equal(params[k], v)]
    problems += [f"not in the file: {k}" for k in params
                 if (f"adapters.{case}." in k or f"shared_parameters.{case}." in k) and k not in saved]
    with torch.no_grad():
        logits = model(**load_file(str(golden / "io.safetensors"))).logits
    expected = load_file(str(folder / f"{case}.safetensors"))["logits"]
    difference = (logits - expected).abs().max().item()
    if difference > TOLERANCE:
        problems.append(f"logits differ by {difference:.3g} (tolerance {TOLERANCE})")
    return problems, notes, difference


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--saved", type=Path, required=True, help="the folder the C++ test wrote")
    parser.add_argument("--golden", type=Path, required=True, help="the adapters_models golden fixture folder")
    args = parser.parse_args()
    try:
        import adapters  # noqa: F401
        from transformers import BertForSequenceClassification, T5ForConditionalGeneration
    except ImportError as e:
        print(f"adapters round trip: tests skipped: the Python references are not installed ({e})")
        return 0
    folders = sorted(p for p in args.saved.glob("*/*") if p.is_dir()) if args.saved.is_dir() else []
    if not folders:
        print(f"adapters round trip: tests skipped: nothing saved under {args.saved} (the C++ test did not run)")
        return 0
    classes = {"t5": T5ForConditionalGeneration, "bert": BertForSequenceClassification}
    failed = 0
    for folder in folders:
        model, case = folder.parent.name, folder.name
        problems, notes, difference = check_case(classes[model], args.golden / model, folder.parent, case)
        print(f"{model} {case}: {'ok' if not problems else 'FAILED'}, max |logits difference| {difference:.3g}")
        for problem in notes + problems:
            print(f"  {problem}")
        failed += bool(problems)
    print(f"adapters round trip: {len(folders) - failed} of {len(folders)} adapters load in adapters with equal logits")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
