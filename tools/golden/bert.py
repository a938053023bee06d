"""Golden fixtures for backbones/bert.hpp: tiny random BERT models from transformers, saved
as Hugging Face folders (whole, sharded, F16, BF16, backbone only) and as traced TorchScript
archives, with inputs (padding, token types, labels) and transformers' outputs.

Written into out_dir:
  cls/, cls_sharded/, cls_f16/, base/       classification (3 labels); base/ is its BertModel alone
  reg/, reg_bf16/                           regression (num_labels 1)
  cls.pt, reg.pt                            torch.jit.trace archives, config.json as an extra file
  inputs.safetensors                        input_ids, attention_mask, token_type_ids, labels_cls, labels_reg
  <model>.safetensors                       last_hidden_state, pooler_output, logits, loss per model
  cls_bf16_forward.safetensors              the same of cls/ loaded in bfloat16 (torch_dtype), computed in bf16
The F16 / BF16 folders come with outputs of the float32 model whose weights went through
that dtype and back, which is what a loader into float32 computes: they compare at 1e-5 too.
"""
import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification


def tiny_config(num_labels):
    return BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
                      hidden_act="gelu", num_labels=num_labels)


def inputs():
    g = torch.Generator().manual_seed(1)
    lengths = [8, 5, 3]
    ids = torch.randint(1, 100, (3, 8), generator=g)
    mask = torch.zeros(3, 8, dtype=torch.long)
    types = torch.zeros(3, 8, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        types[row, n // 2:n] = 1  # a second segment in every row
    ids = ids * mask  # pad id 0 where masked
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
            "labels_cls": torch.tensor([0, 2, 1]), "labels_reg": torch.tensor([0.5, -1.25, 2.0])}


def run(model, x, labels):
    with torch.no_grad():
        base = model.bert(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                          token_type_ids=x["token_type_ids"])
        out = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                    token_type_ids=x["token_type_ids"], labels=labels)
    return {"last_hidden_state": base.last_hidden_state, "pooler_output": base.pooler_output,
            "logits": out.logits, "loss": out.loss.reshape(1)}


def through(model, dtype):
    """The float32 model with every weight rounded to `dtype`."""
    rounded = BertForSequenceClassification(model.config).eval()
    rounded.load_state_dict({k: v.to(dtype).to(v.dtype) for k, v in model.state_dict().items()})
    return rounded


def trace(model, x, path):
    model.config.torchscript = True
    traced = torch.jit.trace(model, (x["input_ids"], x["attention_mask"], x["token_type_ids"]))
    model.config.torchscript = False
    torch.jit.save(traced, str(path), _extra_files={"config.json": model.config.to_json_string()})


def make(out_dir: Path, shared_data: Path):
    x = inputs()
    save_file({k: v.contiguous() for k, v in x.items()}, str(out_dir / "inputs.safetensors"))

    torch.manual_seed(0)
    cls = BertForSequenceClassification(tiny_config(3)).eval()
    cls.save_pretrained(out_dir / "cls")
    cls.save_pretrained(out_dir / "cls_sharded", max_shard_size="40KB")
    copy.deepcopy(cls.bert).save_pretrained(out_dir / "base")  # a copy: saving sets its shared config's architectures
    copy.deepcopy(cls).to(torch.float16).save_pretrained(out_dir / "cls_f16")
    save_file(run(cls, x, x["labels_cls"]), str(out_dir / "cls.safetensors"))
    save_file(run(through(cls, torch.float16), x, x["labels_cls"]), str(out_dir / "cls_f16.safetensors"))
    trace(cls, x, out_dir / "cls.pt")
    bf16 = BertForSequenceClassification.from_pretrained(out_dir / "cls", torch_dtype=torch.bfloat16).eval()
    save_file(run(bf16, x, x["labels_cls"]), str(out_dir / "cls_bf16_forward.safetensors"))

    torch.manual_seed(1)
    reg = BertForSequenceClassification(tiny_config(1)).eval()
    reg.save_pretrained(out_dir / "reg")
    copy.deepcopy(reg).to(torch.bfloat16).save_pretrained(out_dir / "reg_bf16")
    save_file(run(reg, x, x["labels_reg"]), str(out_dir / "reg.safetensors"))
    save_file(run(through(reg, torch.bfloat16), x, x["labels_reg"]), str(out_dir / "reg_bf16.safetensors"))
    trace(reg, x, out_dir / "reg.pt")

    shards = sorted(p.name for p in (out_dir / "cls_sharded").glob("*.safetensors"))
    assert len(shards) > 1, f"cls_sharded was not sharded: {shards}"
    (out_dir / "bert.json").write_text(json.dumps({"shards": shards}))
