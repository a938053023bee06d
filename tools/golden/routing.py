"""Golden fixture for DeltaModel::route: peft's mixed-batch LoRA inference
(`model(..., adapter_names=[...])`) on a tiny random T5 v1.1 with two LoRA adapters.

routing/ holds:
  hf/             the T5 (save_pretrained: config.json + model.safetensors)
  lora_a.safetensors, lora_b.safetensors
                  each adapter's weights, named as DeltaModel::named_delta_parameters names
                  them ("encoder.block.0.layer.0.SelfAttention.q.lora_A")
  lora.json       each adapter's r and alpha, and the per-row adapter names
  io.safetensors  input_ids, attention_mask, decoder_input_ids, and peft's logits
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import T5Config, T5ForConditionalGeneration

ADAPTERS = {"lora_a": dict(r=2, lora_alpha=4), "lora_b": dict(r=4, lora_alpha=8)}
ROWS = ["lora_a", "__base__", "lora_b", "lora_a", "lora_b"]


def make(out_dir: Path, shared_data: Path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2024)
    config = T5Config(vocab_size=100, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=20,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    base = T5ForConditionalGeneration(config).eval()
    base.save_pretrained(out_dir / "hf", safe_serialization=True)

    names = list(ADAPTERS)
    model = get_peft_model(base, LoraConfig(target_modules=["q", "v"], **ADAPTERS[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, LoraConfig(target_modules=["q", "v"], **ADAPTERS[name]))
    model.eval()
    prefix = "base_model.model."
    weights = {name: {} for name in names}
    with torch.no_grad():
        for pname, p in model.named_parameters():
            for name in names:
                tag = f".{name}.weight"
                if pname.endswith(tag) and ".lora_" in pname:
                    if ".lora_B." in pname:
                        p.normal_(0, 0.5)  # peft starts B at zero: the adapters would change nothing
                    site, matrix = pname[len(prefix):-len(tag)].rsplit(".", 1)
                    weights[name][f"{site}.{matrix}"] = p.detach().clone()
    for name in names:
        save_file({k: v.contiguous() for k, v in weights[name].items()}, str(out_dir / f"{name}.safetensors"))
    (out_dir / "lora.json").write_text(json.dumps({"adapters": ADAPTERS, "rows": ROWS}, indent=2))

    g = torch.Generator().manual_seed(7)
    input_ids = torch.randint(2, 100, (len(ROWS), 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    attention_mask[3, 4:] = 0
    input_ids[attention_mask == 0] = 0
    decoder_input_ids = torch.randint(2, 100, (len(ROWS), 4), generator=g)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                       adapter_names=ROWS).logits
    save_file({"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids,
               "logits": logits.contiguous()}, str(out_dir / "io.safetensors"))
