"""Golden fixtures for backbones/t5.hpp: tiny random T5 models from transformers, saved
as Hugging Face folders and as traced TorchScript archives, with their outputs.

Two models: v1.0 (ReLU feed-forward, tied embeddings, 2 + 2 layers) and v1.1 (gated-GELU,
untied lm_head, 3 encoder + 2 decoder layers; transformers 4.57 sizes
its generation cache by num_layers, so the decoder is the smaller stack). Per model <name>/ holds:
  hf/            save_pretrained (config.json + model.safetensors)
  hf_sharded/    the same, sharded (model.safetensors.index.json + shards)   [v1.1]
  hf_half/       the weights in float16 [v1.0] or bfloat16 [v1.1]
  model.pt       torch.jit.trace of (input_ids, attention_mask, decoder_input_ids) -> logits,
                 with config.json as an extra file
  io.safetensors inputs and HF's outputs: encoder_hidden, decoder_hidden, logits, loss,
                 generated (greedy ids); half_* the same for the half-precision weights
                 (computed in float32 from the rounded weights); bf16_* and fp16_*
                 encoder_hidden, decoder_hidden, logits and loss of the hf/ model loaded in
                 bfloat16 or float16 (from_pretrained(torch_dtype=...), which keeps the
                 feed-forward wo in float32 for float16), computed at that precision
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import T5Config, T5ForConditionalGeneration

COMMON = dict(vocab_size=100, d_model=32, d_kv=8, num_heads=4, d_ff=64, relative_attention_num_buckets=8,
              relative_attention_max_distance=20, dropout_rate=0.1, layer_norm_epsilon=1e-6, pad_token_id=0,
              eos_token_id=1, decoder_start_token_id=0)
MODELS = {
    "v1_0": (dict(num_layers=2, feed_forward_proj="relu", tie_word_embeddings=True), torch.float16),
    "v1_1": (dict(num_layers=3, num_decoder_layers=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
             torch.bfloat16),
}
MAX_NEW_TOKENS = 8


class Logits(torch.nn.Module):
    """What gets traced: the model's logits from positional tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          decoder_input_ids=decoder_input_ids, use_cache=False, return_dict=False)[0]


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, 100, (3, 11), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0  # right padding, as tokenizers pad
    attention_mask[2, 4:] = 0
    input_ids[attention_mask == 0] = 0
    labels = torch.randint(2, 100, (3, 6), generator=g)
    labels[0, 5] = 1  # eos
    labels[1, 3:] = -100  # ignored positions
    labels[2, 4:] = -100
    return input_ids, attention_mask, labels


def outputs(model, input_ids, attention_mask, labels):
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_hidden_states=True)
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, num_beams=1,
                                   max_new_tokens=MAX_NEW_TOKENS, min_length=0)
    return {"encoder_hidden": out.encoder_last_hidden_state, "decoder_hidden": out.decoder_hidden_states[-1],
            "logits": out.logits, "loss": out.loss.reshape(1), "generated": generated}


def half_outputs(folder, dtype, prefix, input_ids, attention_mask, labels):
    """transformers' forward with the weights loaded in a half dtype, as a half-precision backbone runs."""
    model = T5ForConditionalGeneration.from_pretrained(folder, torch_dtype=dtype).eval()
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_hidden_states=True)
    return {f"{prefix}_encoder_hidden": out.encoder_last_hidden_state,
            f"{prefix}_decoder_hidden": out.decoder_hidden_states[-1], f"{prefix}_logits": out.logits,
            f"{prefix}_loss": out.loss.reshape(1), f"{prefix}_wo_dtype": torch.tensor(
                [model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32])}


def randomise(model):
    """Random weights far from HF's initialisation so that every path matters: layer norm
    weights away from 1, relative biases large enough to change the attention."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("layer_norm.weight"):
                p.uniform_(0.5, 1.5)
            elif "relative_attention_bias" in pname:
                p.normal_(0, 1.0)
    return model


def make_model(name, overrides, half, out_dir, seed):
    torch.manual_seed(seed)
    config = T5Config(**COMMON, **overrides)
    model = randomise(T5ForConditionalGeneration(config).eval())
    d = out_dir / name
    model.save_pretrained(d / "hf", safe_serialization=True)
    if name == "v1_1":
        model.save_pretrained(d / "hf_sharded", safe_serialization=True, max_shard_size="20KB")

    input_ids, attention_mask, labels = inputs(seed + 1)
    decoder_input_ids = model._shift_right(labels)
    tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
               "decoder_input_ids": decoder_input_ids}
    tensors.update(outputs(model, input_ids, attention_mask, labels))
    tensors.update(half_outputs(d / "hf", torch.bfloat16, "bf16", input_ids, attention_mask, labels))
    tensors.update(half_outputs(d / "hf", torch.float16, "fp16", input_ids, attention_mask, labels))

    traced = torch.jit.trace(Logits(model), (input_ids, attention_mask, decoder_input_ids), check_trace=False)
    torch.jit.save(traced, str(d / "model.pt"), _extra_files={"config.json": config.to_json_string()})
    with torch.no_grad():
        tensors["traced_logits"] = traced(input_ids, attention_mask, decoder_input_ids)

    # Half-precision weights: our loader widens them to float32, so the reference is the
    # float32 model with the same rounded weights.
    model.to(half).save_pretrained(d / "hf_half", safe_serialization=True)
    model.float()
    tensors.update({f"half_{k}": v for k, v in outputs(model, input_ids, attention_mask, labels).items()})

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "io.safetensors"))


def make(out_dir: Path, shared_data: Path):
    for seed, (name, (overrides, half)) in enumerate(MODELS.items()):
        make_model(name, overrides, half, out_dir, 1000 + 10 * seed)
    (out_dir / "models.json").write_text(json.dumps(sorted(MODELS)))
