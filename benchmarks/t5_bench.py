"""T5 forward and forward + backward: ours (the t5_bench binary) against transformers'
T5ForConditionalGeneration, same shapes, same thread count, one run; prints both medians and
ours / transformers. Defaults: T5-base (d_model 768, 12 + 12 layers, 12 heads, d_ff 3072,
vocab 32128), batch 8, source 128, target 8, random weights.

    ~/.cache/deltatune/venv/bin/python benchmarks/t5_bench.py [--bin build/benchmarks/t5_bench]
        [--layers 2 --d-model 256 ...] [--reps 5]

Forward: eval mode, no grad. Forward + backward: training mode (dropout on), gradients to the
layer norm weights only, so backward runs through the whole frozen network, as in delta tuning.
"""
import argparse
import json
import statistics
import subprocess
from pathlib import Path

import torch
from transformers import T5Config, T5ForConditionalGeneration

from peft_bench import timed_ms  # beside this file

SIZES = {"d-model": 768, "layers": 12, "heads": 12, "d-kv": 64, "d-ff": 3072, "vocab": 32128, "batch": 8,
         "src": 128, "tgt": 8, "reps": 5, "warmup": 1}


def median_ms(step, reps, warmup):
    return statistics.median(timed_ms(step, reps, warmup))


def transformers_times(a):
    config = T5Config(d_model=a.d_model, num_layers=a.layers, num_heads=a.heads, d_kv=a.d_kv, d_ff=a.d_ff,
                      vocab_size=a.vocab, feed_forward_proj=a.ffn, tie_word_embeddings=a.ffn == "relu",
                      decoder_start_token_id=0)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("layer_norm.weight"))
    input_ids = torch.randint(2, a.vocab, (a.batch, a.src))
    attention_mask = torch.ones_like(input_ids)
    labels = torch.randint(2, a.vocab, (a.batch, a.tgt))

    def forward():
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)

    def forward_backward():
        model.zero_grad()
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss.backward()

    model.eval()
    f = median_ms(forward, a.reps, a.warmup)
    model.train()
    fb = median_ms(forward_backward, a.reps, a.warmup)
    return {"impl": "transformers", "threads": torch.get_num_threads(), "forward_ms": f, "forward_backward_ms": fb}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", type=Path, default=Path(__file__).resolve().parent.parent / "build/benchmarks/t5_bench")
    parser.add_argument("--ffn", default="relu", choices=["relu", "gated-gelu"])
    for name, default in SIZES.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    a = parser.parse_args()
    flags = ["--ffn", a.ffn] + [x for name in SIZES for x in (f"--{name}", str(getattr(a, name.replace("-", "_"))))]
    run = subprocess.run([str(a.bin), *flags], check=True, capture_output=True, text=True)
    ours = json.loads(next(line[5:] for line in run.stdout.splitlines() if line.startswith("JSON ")))
    peer = transformers_times(a)
    shape = {name: getattr(a, name.replace("-", "_")) for name in SIZES} | {"ffn": a.ffn}
    print(f"t5_bench: {shape}, threads ours {ours['threads']} / transformers {peer['threads']}")
    print(f"{'':>18} {'ours ms':>10} {'transformers ms':>16} {'ours/theirs':>12}")
    result = {"bench": "t5", **shape}
    for key, label in (("forward_ms", "forward"), ("forward_backward_ms", "forward+backward")):
        ratio = ours[key] / peer[key]
        print(f"{label:>18} {ours[key]:>10.1f} {peer[key]:>16.1f} {ratio:>12.2f}")
        result |= {f"ours_{key}": round(ours[key], 3), f"transformers_{key}": round(peer[key], 3),
                   f"ratio_{key}": round(ratio, 3)}
    print("JSON " + json.dumps(result))


if __name__ == "__main__":
    main()
