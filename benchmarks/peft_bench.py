"""Delta tuning, ours against the Python peers, one run: for every row (model shape, batch, source
/ target length, method) a training step (zero_grad, forward, backward, AdamW on the trainable
parameters) of our C++ (the delta_bench binary) and of the peer, and inference forwards of the
bare backbone, LoRA merged and unmerged, and Houlsby adapters.

Peers: transformers full fine-tuning; transformers + peft for LoRA, DoRA, PiSSA, OLoRA, VeRA, LoKr, IA3,
prefix and prompt tuning; transformers + adapters for Houlsby, Compacter and Compacter++; BitFit
in transformers: T5 has no biases, so, as our BitFit recipe does, every Linear gets a zero bias
that trains, weights frozen.

Both sides load the same random T5 (written once from Python as a Hugging Face folder, read in C++
with load_t5), run with the same thread count, and each row of each side runs in its own fresh
process, so peak memories do not mix: ours a delta_bench process, the peer's a process forked
from this driver after it imported torch, transformers, peft and adapters (once: here those
imports take most of a minute) and before it ran any torch operation. Peak memory, on CUDA:
max_memory_allocated. On CPU two figures: the process's RSS high-water mark (VmHWM) from after
loading the model (reset then, so the checkpoint's transient copies do not count), which also
holds the runtime and the heap the allocator keeps; and peak tensor memory allocated, CUDA's
figure on the CPU: the tensors at rest (weights, buffers, optimizer state, each storage once)
plus the most that one more step, after the timed ones, allocates above them, from the reports
torch's CPU allocator makes to a memory profiler (ours benchmarks/memory_profile.hpp, the peer
torch.profiler's profile_memory).

    ~/.cache/deltatune/venv/bin/python benchmarks/peft_bench.py [--device cpu|cuda] [--full]
        [--rows REGEX] [--steps N] [--warmup N] [--threads N] [--out benchmarks/results/cpu.json]
        [--profile N] [--interleave N] [--precision fp32|bf16]

Writes the JSON (--out) and a Markdown table beside it (.md) after every row, and prints the table.
With --profile N, both sides also run their steps again under an operator profile (ours:
benchmarks/op_profile.hpp, the peer: torch.profiler; both built on RecordFunction, so the names
match) and each row prints the N operators whose self time per step differs most.
With --interleave N, an inference row of a method also runs N forwards alternating with N of a
bare copy of the backbone in the same process, and its time / bare figure becomes the median of
those N paired ratios: both forwards of a pair see the same machine, however it drifts.
With --precision bf16, each row runs three ways: ours with the frozen backbone loaded in bf16
(deltas and optimizer state in float32; full fine-tuning: float32 weights under bf16 autocast),
ours in float32 (the "ours fp32" columns), and the peer with the backbone loaded in bf16
(from_pretrained(torch_dtype=torch.bfloat16); full fine-tuning in float32) running under
torch.autocast(device, torch.bfloat16), transformers' and peft's documented way; the
"bf16 / fp32" columns are ours in bf16 over ours in float32.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # T5 v1.0 shapes, vocabulary 32128, ReLU feed-forward, tied embeddings
    "t5-tiny": dict(d_model=128, num_layers=2, num_heads=4, d_kv=32, d_ff=256, vocab_size=1000),
    "t5-small": dict(d_model=512, num_layers=6, num_heads=8, d_kv=64, d_ff=2048, vocab_size=32128),
    "t5-base": dict(d_model=768, num_layers=12, num_heads=12, d_kv=64, d_ff=3072, vocab_size=32128),
}
METHODS = ["full", "lora", "lora-dropout", "dora", "pissa", "olora", "vera", "lokr", "ia3", "prefix", "prompt", "adapter", "compacter", "compacter++", "bitfit"]
INFER = ["bare", "lora-merged", "lora", "adapter"]
PEER = {"full": "transformers", "bitfit": "transformers (zero biases)", "lora": "peft", "lora-dropout": "peft",
        "dora": "peft", "pissa": "peft",
        "olora": "peft", "vera": "peft", "lokr": "peft", "ia3": "peft", "prefix": "peft", "prompt": "peft", "adapter": "adapters", "compacter": "adapters",
        "compacter++": "adapters", "bare": "transformers", "lora-merged": "peft"}


def row(model, batch, src, tgt, mode, method, steps=None):
    return dict(model=model, batch=batch, src=src, tgt=tgt, mode=mode, method=method, steps=steps,
                id=f"{model}/b{batch}/{src}x{tgt}/{mode}/{method}")


def grid(name):
    """The rows of a grid. cpu: about 15 minutes on a quiet 2-core machine; full: the issue's
    whole grid, for a GPU; tiny: seconds, for development and the smoke test; bf16: the
    mixed-precision rows (run with --precision bf16)."""
    if name == "bf16":
        return [row(model, batch, 128, 8, "train", m) for model in ("t5-small", "t5-base") for batch in (8, 32)
                for m in ("full", "lora", "adapter", "compacter++")]
    if name == "tiny":
        return [row("t5-tiny", 2, 16, 4, "train", m) for m in METHODS] + \
               [row("t5-tiny", 2, 16, 4, "infer", m) for m in INFER]
    if name == "full":
        rows = []
        for model in ("t5-small", "t5-base"):
            for batch in (8, 32):
                for src, tgt in ((128, 8), (512, 128)):
                    rows += [row(model, batch, src, tgt, "train", m) for m in METHODS]
                    rows += [row(model, batch, src, tgt, "infer", m) for m in INFER]
        return rows
    few = ["full", "lora", "compacter++", "bitfit"]
    return ([row("t5-small", 8, 128, 8, "train", m) for m in METHODS]
            + [row("t5-small", 8, 128, 8, "infer", m) for m in INFER]
            + [row("t5-base", 8, 128, 8, "train", m, steps=3) for m in few]
            + [row("t5-small", 8, 512, 128, "train", m, steps=3) for m in ("full", "lora")])


def timed_ms(step, steps, warmup, sync=lambda: None):
    """Milliseconds of each of `steps` calls of step() after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def write_model(name, folder):
    """The random T5 both sides load, written once per shape."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    config = T5Config(**SHAPES[name], feed_forward_proj="relu", tie_word_embeddings=True, decoder_start_token_id=0)
    T5ForConditionalGeneration(config).save_pretrained(folder, safe_serialization=True)


# ---- the peer, in its own process (--worker) ----

def proc_status_mb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return -1


def add_zero_biases(model):
    """BitFit on a bias-free T5: every Linear gets a zero bias that trains, as our recipe."""
    import torch
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.bias is None:
            module.bias = torch.nn.Parameter(torch.zeros(module.out_features))


def peer_model(folder, method, precision="fp32"):
    """The transformers model with the peer's form of the method, and its trainable parameters;
    in bf16 the backbone is loaded in bfloat16 (full fine-tuning keeps float32 weights)."""
    import torch
    from transformers import T5ForConditionalGeneration
    dtype = torch.bfloat16 if precision == "bf16" and method != "full" else torch.float32
    model = T5ForConditionalGeneration.from_pretrained(folder, torch_dtype=dtype)
    model.requires_grad_(method == "full")
    if method in ("lora", "lora-merged", "lora-dropout", "dora", "pissa", "olora", "vera", "lokr", "ia3", "prefix", "prompt"):
        import peft
        kind = peft.TaskType.SEQ_2_SEQ_LM
        config = {"lora": lambda: peft.LoraConfig(task_type=kind, r=8, lora_alpha=16, lora_dropout=0.0,
                                                  target_modules=["q", "v"]),
                  "lora-dropout": lambda: peft.LoraConfig(task_type=kind, r=8, lora_alpha=16, lora_dropout=0.1,
                                                          target_modules=["q", "v"]),
                  "dora": lambda: peft.LoraConfig(task_type=kind, r=8, lora_alpha=16, lora_dropout=0.0,
                                                  target_modules=["q", "v"], use_dora=True),
                  # peft folds the initial factors into a residual weight; we subtract them (methods/lora.hpp)
                  "pissa": lambda: peft.LoraConfig(task_type=kind, r=8, lora_alpha=16, lora_dropout=0.0,
                                                   target_modules=["q", "v"], init_lora_weights="pissa"),
                  "olora": lambda: peft.LoraConfig(task_type=kind, r=8, lora_alpha=16, lora_dropout=0.0,
                                                   target_modules=["q", "v"], init_lora_weights="olora"),
                  "vera": lambda: peft.VeraConfig(task_type=kind, r=256, target_modules=["q", "v"]),
                  "lokr": lambda: peft.LoKrConfig(task_type=kind, r=8, alpha=8, target_modules=["q", "v"]),
                  "ia3": lambda: peft.IA3Config(task_type=kind),
                  "prefix": lambda: peft.PrefixTuningConfig(task_type=kind, num_virtual_tokens=30,
                                                            prefix_projection=True, encoder_hidden_size=512),
                  "prompt": lambda: peft.PromptTuningConfig(task_type=kind, num_virtual_tokens=100),
                  }[method.replace("-merged", "")]()
        model = peft.get_peft_model(model, config)
        if method == "lora-merged":
            model.merge_adapter()
    elif method in ("adapter", "compacter", "compacter++"):
        import adapters
        adapters.init(model)
        config = {"adapter": lambda: adapters.DoubleSeqBnConfig(non_linearity="gelu"),
                  "compacter": adapters.CompacterConfig, "compacter++": adapters.CompacterPlusPlusConfig}[method]()
        model.add_adapter(method, config=config)
        model.train_adapter(method)
        for name, p in model.named_parameters():  # the layer norms train with adapters, as in ours
            if "layer_norm" in name:
                p.requires_grad_(True)
    elif method == "bitfit":
        add_zero_biases(model)
    return model, [p for p in model.parameters() if p.requires_grad]


def worker(spec):
    import torch
    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model, params = peer_model(spec["folder"], spec["method"], spec["precision"])
    model.to(device)
    load_peak = proc_status_mb("VmHWM")
    vocab = SHAPES[spec["model"]]["vocab_size"]
    input_ids = torch.randint(2, vocab, (spec["batch"], spec["src"]), device=device)
    attention_mask = torch.ones_like(input_ids)
    labels = torch.randint(2, vocab, (spec["batch"], spec["tgt"]), device=device)
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["precision"] == "bf16"):
            return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)

    def train_step():
        optimizer.zero_grad()
        forward().loss.backward()
        optimizer.step()

    def infer_step():
        with torch.no_grad():
            forward()

    model.train(spec["mode"] == "train")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")
    step = train_step if spec["mode"] == "train" else infer_step
    sync = torch.cuda.synchronize if cuda else lambda: None
    times = timed_ms(step, spec["steps"], spec["warmup"], sync)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else proc_status_mb("VmHWM")
    ops = operator_profile(step, spec["steps"]) if spec.get("profile") else None
    result = {"impl": "peer", "method": spec["method"], "mode": spec["mode"], "threads": torch.get_num_threads(),
              "times_ms": times, "median_ms": statistics.median(times), "peak_mb": peak, "load_peak_mb": load_peak,
              "trainable": sum(p.numel() for p in params)}
    if spec["mode"] == "infer" and spec["method"] != "bare" and spec.get("interleave", 0) > 0:
        bare, _ = peer_model(spec["folder"], "bare", spec["precision"])
        bare.to(device).eval()

        def bare_step():
            with torch.no_grad():
                bare(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
        result.update(interleaved(infer_step, bare_step, spec["interleave"], sync))
    if cuda:
        result["alloc_mb"] = peak  # max_memory_allocated already
    else:
        if optimizer:
            optimizer.zero_grad()  # gradients are not at rest: the step makes them
        result.update(allocated_mb(step, model, optimizer))
    print("JSON " + json.dumps(result))
    if ops is not None:
        print("OPS " + json.dumps(ops))


def interleaved(step, bare_step, n, sync):
    """n calls of step() alternating with n of bare_step(): their medians and the median of the
    n ratios step / bare_step, each pair timed back to back."""
    with_, without = [], []
    for _ in range(n):
        with_ += timed_ms(step, 1, 0, sync)
        without += timed_ms(bare_step, 1, 0, sync)
    return {"interleaved_ms": statistics.median(with_), "interleaved_bare_ms": statistics.median(without),
            "interleaved_ratio": statistics.median(w / b for w, b in zip(with_, without))}


def allocated_mb(step, model, optimizer):
    """The CPU figure beside the RSS, as ours (benchmarks/memory_profile.hpp): the tensors at rest
    (weights, buffers, optimizer state, each storage once) plus the most that one more step
    allocates above them, from the allocator's reports that torch.profiler records."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    at_rest = [*model.parameters(), *model.buffers()]
    if optimizer:
        at_rest += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    rest = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in at_rest}.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return {"rest_mb": rest / 2**20, "alloc_mb": (rest + peak) / 2**20}


def operator_profile(step, steps):
    """Calls and self milliseconds per step of each operator over `steps` more steps, and
    those steps' median time."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        times = timed_ms(step, steps, 0, lambda: None)
    return {"step_ms": statistics.median(times),
            "ops": {e.key: {"calls": e.count / steps, "self_ms": e.self_cpu_time_total / 1e3 / steps}
                    for e in prof.key_averages()}}


# ---- the driver ----

def json_result(returncode, stdout, stderr):
    lines = [line[5:] for line in stdout.splitlines() if line.startswith("JSON ")]
    if returncode != 0 or not lines:
        return {"error": (stderr.strip().splitlines() or ["no output"])[-1][:300]}
    result = json.loads(lines[-1])
    ops = [line[4:] for line in stdout.splitlines() if line.startswith("OPS ")]
    if ops:
        result["ops"] = json.loads(ops[-1])
    return result


def profile_table(ours, theirs, top):
    """The `top` operators whose self time per step differs most between the two profiles,
    then all operators' time and the rest of the step (outside any operator: the optimizer's
    and autograd's bookkeeping, the interpreter, freeing memory)."""
    o_ops, t_ops = ours["ops"], theirs["ops"]
    names = sorted(set(o_ops) | set(t_ops), key=lambda n: -abs(o_ops.get(n, {}).get("self_ms", 0)
                                                               - t_ops.get(n, {}).get("self_ms", 0)))
    zero = {"calls": 0, "self_ms": 0}
    lines = ["| operator | ours calls/step | peer calls/step | ours self ms/step | peer self ms/step |",
             "|---|---|---|---|---|"]
    for n in names[:top]:
        o, t = o_ops.get(n, zero), t_ops.get(n, zero)
        lines.append(f"| {n} | {o['calls']:.0f} | {t['calls']:.0f} | {o['self_ms']:.1f} | {t['self_ms']:.1f} |")
    total = [sum(p[n]["self_ms"] for n in p) for p in (o_ops, t_ops)]
    lines.append(f"| (all operators) | | | {total[0]:.1f} | {total[1]:.1f} |")
    lines.append(f"| (outside operators) | | | {ours['step_ms'] - total[0]:.1f} | {theirs['step_ms'] - total[1]:.1f} |")
    lines.append(f"| (profiled step) | | | {ours['step_ms']:.1f} | {theirs['step_ms']:.1f} |")
    return "\n".join(lines)


def run_json(command):
    run = subprocess.run(command, capture_output=True, text=True)
    return json_result(run.returncode, run.stdout, run.stderr)


def in_child(function, *args):
    """function(*args) in a forked child, its stdout and stderr captured: a fresh process that
    shares this one's imports. This process runs no torch operation, so the child's OpenMP
    starts clean."""
    import tempfile
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        pid = os.fork()
        if pid == 0:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            code = 0
            try:
                function(*args)
            except BaseException:
                import traceback
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return json_result(os.waitstatus_to_exitcode(status), out.read(), err.read())


def measure(r, a, folder):
    steps = r["steps"] or a.steps
    flags = dict(batch=r["batch"], src=r["src"], tgt=r["tgt"], steps=steps, warmup=a.warmup, threads=a.threads,
                 device=a.device, profile=int(a.profile > 0), interleave=a.interleave, precision=a.precision)

    def run_ours(precision):
        return run_json([str(a.bin), "--model", str(folder), "--method", r["method"], "--mode", r["mode"],
                         *[x for k, v in dict(flags, precision=precision).items() for x in (f"--{k}", str(v))]])
    ours = run_ours(a.precision)
    ours_fp32 = run_ours("fp32") if a.precision == "bf16" else None
    spec = dict(flags, folder=str(folder), model=r["model"], method=r["method"], mode=r["mode"])
    peer = in_child(worker, spec)
    tokens = r["batch"] * (r["src"] + r["tgt"])
    if "ops" in ours and "ops" in peer:
        print(profile_table(ours.pop("ops"), peer.pop("ops"), a.profile), flush=True)
    out = dict(r, steps=steps, peer=PEER[r["method"]], ours=ours, theirs=peer, load_1m=os.getloadavg()[0],
               precision=a.precision)
    if ours_fp32 is not None:
        out["ours_fp32"] = ours_fp32
    for result in (ours, peer, ours_fp32 or {}):
        if "median_ms" in result:
            result["tokens_per_s"] = tokens / (result["median_ms"] / 1e3)
    if ours_fp32 and "median_ms" in ours and "median_ms" in ours_fp32:
        out["bf16_speedup"] = ours_fp32["median_ms"] / ours["median_ms"]  # ours bf16 over ours float32
        out["bf16_memory"] = ours["peak_mb"] / ours_fp32["peak_mb"]
        if "alloc_mb" in ours and "alloc_mb" in ours_fp32:
            out["bf16_alloc"] = ours["alloc_mb"] / ours_fp32["alloc_mb"]
    if "median_ms" in ours and "median_ms" in peer:
        out["time_ratio"] = ours["median_ms"] / peer["median_ms"]  # ours / peer: below 1 is faster
        out["speedup"] = peer["median_ms"] / ours["median_ms"]      # throughput ours / peer
        out["memory_ratio"] = ours["peak_mb"] / peer["peak_mb"]
    if "alloc_mb" in ours and "alloc_mb" in peer:
        out["alloc_ratio"] = ours["alloc_mb"] / peer["alloc_mb"]
    return out


def add_baseline_ratios(results):
    """Each method's time and memory over full fine-tuning's (training) or the bare backbone's
    (inference) in the same implementation, shape and batch."""
    base = {}
    for r in results:
        if r["method"] in ("full", "bare"):
            base[(r["model"], r["batch"], r["src"], r["tgt"], r["mode"])] = r
    for r in results:
        b = base.get((r["model"], r["batch"], r["src"], r["tgt"], r["mode"]))
        if not b:
            continue
        for side in ("ours", "theirs"):
            if "median_ms" in r[side] and "median_ms" in b[side]:
                r[side]["time_vs_base"] = r[side]["median_ms"] / b[side]["median_ms"]
                r[side]["memory_vs_base"] = r[side]["peak_mb"] / b[side]["peak_mb"]
            if "alloc_mb" in r[side] and "alloc_mb" in b[side]:
                r[side]["alloc_vs_base"] = r[side]["alloc_mb"] / b[side]["alloc_mb"]
            if "interleaved_ratio" in r[side]:  # measured beside the bare model: the better figure
                r[side]["time_vs_base"] = r[side]["interleaved_ratio"]


def fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else "—"


def markdown(results):
    """Per mode a time table and a memory table (peak RSS and peak tensor memory allocated)."""
    lines = []
    for mode, title, base in (("train", "Training step (forward, backward, AdamW)", "full FT"),
                              ("infer", "Inference forward (no grad)", "bare")):
        rows = [r for r in results if r["mode"] == mode]
        if not rows:
            continue
        lines += [f"### {title}: time", "",
                  f"| row | peer | ours ms | peer ms | ours tok/s | peer tok/s | speedup | ours / {base} | "
                  f"peer / {base} |", "|" + "---|" * 9]
        for r in rows:
            o, t = r["ours"], r["theirs"]
            lines.append("| " + " | ".join([
                row_label(r), r["peer"], fmt(o.get("median_ms"), ".1f"), fmt(t.get("median_ms"), ".1f"),
                fmt(o.get("tokens_per_s"), ".0f"), fmt(t.get("tokens_per_s"), ".0f"), fmt(r.get("speedup"), ".2f"),
                fmt(o.get("time_vs_base"), ".2f"), fmt(t.get("time_vs_base"), ".2f")]) + " |")
        lines += ["", f"### {title}: peak memory (MiB)", "",
                  f"| row | ours RSS | peer RSS | ours / peer | ours alloc | peer alloc | ours / peer | "
                  f"ours RSS / {base} | peer RSS / {base} | ours alloc / {base} | peer alloc / {base} |",
                  "|" + "---|" * 11]
        for r in rows:
            o, t = r["ours"], r["theirs"]
            lines.append("| " + " | ".join([
                row_label(r), fmt(o.get("peak_mb"), ".0f"), fmt(t.get("peak_mb"), ".0f"),
                fmt(r.get("memory_ratio"), ".2f"), fmt(o.get("alloc_mb"), ".0f"), fmt(t.get("alloc_mb"), ".0f"),
                fmt(r.get("alloc_ratio"), ".2f"), fmt(o.get("memory_vs_base"), ".2f"),
                fmt(t.get("memory_vs_base"), ".2f"), fmt(o.get("alloc_vs_base"), ".2f"),
                fmt(t.get("alloc_vs_base"), ".2f")]) + " |")
        lines.append("")
        rows = [r for r in rows if "ours_fp32" in r]
        if rows:
            lines += [f"### {title}: ours in bf16 against ours in float32 and the peer in bf16", "",
                      "| row | ours fp32 ms | ours bf16 ms | peer bf16 ms | bf16 / fp32 speedup | speedup vs peer | "
                      "ours fp32 RSS | ours bf16 RSS | peer bf16 RSS | bf16 / fp32 RSS | ours / peer RSS | "
                      "ours fp32 alloc | ours bf16 alloc | peer bf16 alloc | bf16 / fp32 alloc | ours / peer alloc |",
                      "|" + "---|" * 16]
            for r in rows:
                o, f, t = r["ours"], r["ours_fp32"], r["theirs"]
                lines.append("| " + " | ".join([
                    row_label(r), fmt(f.get("median_ms"), ".1f"), fmt(o.get("median_ms"), ".1f"),
                    fmt(t.get("median_ms"), ".1f"), fmt(r.get("bf16_speedup"), ".2f"), fmt(r.get("speedup"), ".2f"),
                    fmt(f.get("peak_mb"), ".0f"), fmt(o.get("peak_mb"), ".0f"), fmt(t.get("peak_mb"), ".0f"),
                    fmt(r.get("bf16_memory"), ".2f"), fmt(r.get("memory_ratio"), ".2f"),
                    fmt(f.get("alloc_mb"), ".0f"), fmt(o.get("alloc_mb"), ".0f"), fmt(t.get("alloc_mb"), ".0f"),
                    fmt(r.get("bf16_alloc"), ".2f"), fmt(r.get("alloc_ratio"), ".2f")]) + " |")
            lines.append("")
    return "\n".join(lines)


def row_label(r):
    label = f"{r['model']} b{r['batch']} {r['src']}/{r['tgt']} {r['method']}"
    o, t = r["ours"], r["theirs"]
    if "error" in o or "error" in t:
        label += " (error: " + (o.get("error") or t.get("error")).replace("|", "/") + ")"
    return label


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", metavar="JSON", help="run one peer row in this process (to profile it)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--grid", default=None, choices=["cpu", "full", "tiny", "bf16"],
                        help="rows to run (default: cpu on --device cpu, full on cuda)")
    parser.add_argument("--full", action="store_true", help="the whole grid (--grid full)")
    parser.add_argument("--rows", default="", help="only rows whose id (model/bB/SRCxTGT/mode/method) matches")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (rows of the cpu grid may set fewer)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="both sides; 0: torch's default")
    parser.add_argument("--bin", type=Path, default=ROOT / "build/benchmarks/delta_bench")
    parser.add_argument("--models", type=Path, default=ROOT / "build/bench_models", help="where the random T5s go")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile both sides' operators too and print the N that differ most per row")
    parser.add_argument("--interleave", type=int, default=0, metavar="N",
                        help="inference rows: also N forwards alternating with a bare copy of the backbone in the "
                             "same process; the time / bare columns then give the median of those paired ratios")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: ours and the peer with the backbone in bfloat16, and ours in float32 beside them")
    parser.add_argument("--out", type=Path, default=None, help="JSON results; the Markdown table goes beside it")
    a = parser.parse_args()
    if a.worker:
        return worker(json.loads(a.worker))
    import adapters, peft, torch, transformers  # noqa: F401, E401  once, for every forked peer
    if a.threads == 0:
        a.threads = torch.get_num_threads()
    name = "full" if a.full else a.grid or ("full" if a.device == "cuda" else "cpu")
    rows = [r for r in grid(name) if re.search(a.rows, r["id"])]
    results, table = [], ""
    for r in rows:
        folder = a.models / r["model"]
        if not (folder / "model.safetensors").exists():
            in_child(write_model, r["model"], folder)
        results.append(measure(r, a, folder))
        o, t = results[-1]["ours"], results[-1]["theirs"]
        print(f"{r['id']}: ours {fmt(o.get('median_ms'), '.1f')} ms {fmt(o.get('peak_mb'), '.0f')} MiB RSS "
              f"{fmt(o.get('alloc_mb'), '.0f')} MiB alloc, peer {fmt(t.get('median_ms'), '.1f')} ms "
              f"{fmt(t.get('peak_mb'), '.0f')} MiB RSS {fmt(t.get('alloc_mb'), '.0f')} MiB alloc "
              f"{o.get('error', '')}{t.get('error', '')}", flush=True)
        table = write_results(results, a, name)  # after every row: a long run keeps what it measured
    print(table)


def write_results(results, a, name):
    add_baseline_ratios(results)
    table = markdown(results)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"device": a.device, "grid": name, "threads": a.threads, "warmup": a.warmup,
                                     "date": time.strftime("%Y-%m-%d %H:%M %Z"), "rows": results}, indent=1) + "\n")
        a.out.with_suffix(".md").write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
