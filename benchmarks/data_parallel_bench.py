"""Data-parallel training at 1 and 2 processes, ours against the peer, one run: T5-small, batch 8
per process, 128 source / 8 target tokens, full fine-tuning, LoRA and Compacter++; each process
one thread (the 2 processes share this machine's 2 cores). Ours: delta_bench alone and under
tools/launch -n 2 (GradientSync all-reduces the trainable tensors' gradients over Gloo). The
peer: the same model and methods as benchmarks/peft_bench.py (transformers + peft / adapters),
alone and under torch.distributed.run with DistributedDataParallel over Gloo, its documented way.

Per row: the bytes each process sends into the all-reduce per step (the trainable tensors'), the
median step time, throughput (examples per second, all processes) and the scaling efficiency
(2-process throughput over twice the 1-process one). Runs alternate ours and the peer's, 1 and 2
processes, for --rounds rounds; each figure is the median over the rounds of each run's median.

    ~/.cache/deltatune/venv/bin/python benchmarks/data_parallel_bench.py [--rounds 2] [--steps 6]
        [--warmup 2] [--methods full,lora,compacter++] [--out benchmarks/results/data_parallel.json]

Writes the JSON (--out) and a Markdown table beside it (.md), and prints the table.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peft_bench import SHAPES, in_child, json_result, peer_model, timed_ms, write_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BATCH, SRC, TGT = 8, 128, 8


def peer_worker(spec):
    """One process of the peer: DistributedDataParallel over Gloo under torch.distributed.run."""
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    model, params = peer_model(spec["folder"], spec["method"])
    model.train()
    if world > 1:
        dist.init_process_group("gloo")
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    torch.manual_seed(rank + 1)  # each rank its own batch
    vocab = SHAPES["t5-small"]["vocab_size"]
    input_ids = torch.randint(2, vocab, (BATCH, SRC))
    labels = torch.randint(2, vocab, (BATCH, TGT))

    def step():
        optimizer.zero_grad()
        model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels, use_cache=False).loss.backward()
        optimizer.step()

    times = timed_ms(step, spec["steps"], spec["warmup"])
    if rank == 0:
        print("JSON " + json.dumps({"impl": "peer", "ranks": world, "times_ms": times,
                                    "median_ms": statistics.median(times),
                                    "allreduce_bytes": sum(p.numel() * p.element_size() for p in params) if world > 1 else 0,
                                    "trainable": sum(p.numel() for p in params)}))
    if world > 1:
        dist.destroy_process_group()


def run(command):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    return json_result(done.returncode, done.stdout, done.stderr)


def ours(a, folder, method, ranks):
    command = [str(a.bin), "--model", str(folder), "--method", method, "--threads", "1", "--batch", str(BATCH),
               "--src", str(SRC), "--tgt", str(TGT), "--steps", str(a.steps), "--warmup", str(a.warmup)]
    return run(([str(ROOT / "tools/launch"), "-n", str(ranks)] if ranks > 1 else []) + command)


def peer(a, folder, method, ranks):
    spec = json.dumps({"folder": str(folder), "method": method, "steps": a.steps, "warmup": a.warmup})
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    return run((launcher if ranks > 1 else [sys.executable]) + [__file__, "--peer-worker", spec])


def summarise(runs):
    """The median over rounds of each run's median step, and what follows from it."""
    ok = [r for r in runs if "median_ms" in r]
    if not ok:
        return {"error": runs[-1].get("error", "no run finished")}
    step_ms = statistics.median(r["median_ms"] for r in ok)
    return {"step_ms": step_ms, "round_ms": [r["median_ms"] for r in ok], "allreduce_bytes": ok[0]["allreduce_bytes"],
            "trainable": ok[0]["trainable"], "examples_per_s": ok[0]["ranks"] * BATCH * 1e3 / step_ms}


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(rows):
    full = {side: next((r[side]["2"].get("allreduce_bytes") for r in rows if r["method"] == "full"), None)
            for side in ("ours", "peer")}
    lines = ["| method | trainable | all-reduced per step | of full's | ours 1 proc | ours 2 procs | ours speed-up "
             "| efficiency | peer 1 proc | peer 2 procs | peer speed-up | efficiency | ours / peer step (2 procs) |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        o1, o2, p1, p2 = r["ours"]["1"], r["ours"]["2"], r["peer"]["1"], r["peer"]["2"]
        speed = lambda one, two: two["examples_per_s"] / one["examples_per_s"] if "step_ms" in one and "step_ms" in two else None
        ours_speed, peer_speed = speed(o1, o2), speed(p1, p2)
        share = o2["allreduce_bytes"] / full["ours"] if full["ours"] and "allreduce_bytes" in o2 else None
        lines.append(
            f"| {r['method']} | {fmt(o2.get('trainable'), ',')} | {fmt(o2.get('allreduce_bytes', 0) / 2**20, '.2f')} MiB "
            f"| {fmt(share and 100 * share, '.2f')}% | {fmt(o1.get('step_ms'), '.0f')} ms | {fmt(o2.get('step_ms'), '.0f')} ms "
            f"| {fmt(ours_speed, '.2f')}x | {fmt(ours_speed and ours_speed / 2, '.2f')} | {fmt(p1.get('step_ms'), '.0f')} ms "
            f"| {fmt(p2.get('step_ms'), '.0f')} ms | {fmt(peer_speed, '.2f')}x | {fmt(peer_speed and peer_speed / 2, '.2f')} "
            f"| {fmt(o2.get('step_ms') and p2.get('step_ms') and o2['step_ms'] / p2['step_ms'], '.2f')} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", default="full,lora,compacter++")
    parser.add_argument("--bin", type=Path, default=ROOT / "build/benchmarks/delta_bench")
    parser.add_argument("--models", type=Path, default=ROOT / "build/bench_models")
    parser.add_argument("--out", type=Path, default=None)
    a = parser.parse_args()
    if a.peer_worker:
        return peer_worker(json.loads(a.peer_worker))
    folder = a.models / "t5-small"
    if not (folder / "model.safetensors").exists():
        in_child(write_model, "t5-small", folder)
    rows = []
    for method in a.methods.split(","):
        runs = {(side, ranks): [] for side in ("ours", "peer") for ranks in (1, 2)}
        for round_ in range(a.rounds):
            for side, ranks in runs:
                runs[side, ranks].append((ours if side == "ours" else peer)(a, folder, method, ranks))
                last = runs[side, ranks][-1]
                print(f"{method} {side} {ranks} proc round {round_ + 1}: {fmt(last.get('median_ms'), '.0f')} ms "
                      f"{last.get('error', '')}", flush=True)
        rows.append({"method": method, **{side: {str(n): summarise(runs[side, n]) for n in (1, 2)}
                                          for side in ("ours", "peer")}})
        table = markdown(rows)
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps({"model": "t5-small", "batch_per_process": BATCH, "src": SRC, "tgt": TGT,
                                         "threads_per_process": 1, "steps": a.steps, "warmup": a.warmup,
                                         "rounds": a.rounds, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                                         "rows": rows}, indent=1) + "\n")
            a.out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
