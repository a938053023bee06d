"""Whole-model golden fixtures for formats/adapters.hpp: tiny random T5
(T5ForConditionalGeneration) and BERT (BertForSequenceClassification) from transformers,
with bottleneck adapters added by the adapters library itself, saved in its own layout.

Per backbone <model>/ (t5, bert) holds:
  hf/               the backbone alone, save_pretrained before adapters.init
  io.safetensors    the fixed batch: input_ids, attention_mask (+ decoder_input_ids for
                    T5, token_type_ids for BERT)
  <case>/           model.save_adapter(dir, case, use_safetensors=True): adapter_config.json
                    and adapter.safetensors, adapters' key names
  <case>.safetensors  logits of the model with that adapter active (eval mode), a fixed
                    cotangent R and "grad.<key>": the gradient of sum(logits * R) for every
                    tensor of adapter.safetensors, under the same key
Cases: houlsby (DoubleSeqBnConfig, adapters' defaults: swish, reduction 16 -> here 4),
pfeiffer (SeqBnConfig), phm (PHM layers, full B, each layer its own rule), phm_shared
(adapters' PHM default: one rule shared by the model), compacter (CompacterConfig),
compacter_pp (CompacterPlusPlusConfig). adapters initialises the up-projections near zero;
every adapter tensor is redrawn here so that each of them changes the outputs.

adapters 1.3.0 leaves a shared PHM rule out of what save_adapter writes (and what
load_adapter reads) when the model is its own base model, as T5ForConditionalGeneration is:
its filter wants ".shared_parameters.<name>." and the key there is
"shared_parameters.<name>.phm_rule", with no dot before it (BERT's is
"bert.shared_parameters..."). The T5 fixtures add the rule under that key, so that the
adapter they describe is whole.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification, T5Config, T5ForConditionalGeneration

D = 16
PHM = dict(phm_layer=True, phm_dim=2, factorized_phm_W=False)


def cases():
    from adapters import CompacterConfig, CompacterPlusPlusConfig, DoubleSeqBnConfig, SeqBnConfig

    return {
        "houlsby": DoubleSeqBnConfig(reduction_factor=4),
        "pfeiffer": SeqBnConfig(reduction_factor=4),
        "phm": DoubleSeqBnConfig(reduction_factor=4, shared_phm_rule=False, **PHM),
        "phm_shared": DoubleSeqBnConfig(reduction_factor=4, non_linearity="gelu", **PHM),
        "compacter": CompacterConfig(reduction_factor=2, phm_dim=4),
        "compacter_pp": CompacterPlusPlusConfig(reduction_factor=2, phm_dim=4),
    }


def t5_model():
    config = T5Config(vocab_size=64, d_model=D, d_kv=4, num_heads=4, d_ff=32, num_layers=2, num_decoder_layers=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.1,
                      feed_forward_proj="relu", tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    return T5ForConditionalGeneration(config)


def bert_model():
    config = BertConfig(vocab_size=64, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=32, max_position_embeddings=32, type_vocab_size=2, num_labels=3)
    return BertForSequenceClassification(config)


def batch(name):
    g = torch.Generator().manual_seed(7)
    input_ids = torch.randint(2, 64, (2, 7), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    input_ids[attention_mask == 0] = 0
    io = {"input_ids": input_ids, "attention_mask": attention_mask}
    if name == "t5":
        io["decoder_input_ids"] = torch.randint(2, 64, (2, 5), generator=g)
    else:
        io["token_type_ids"] = (torch.arange(7) >= 4).long().expand(2, 7).contiguous()
    return io


def logits(model, io):
    return model(**io).logits


def randomise_backbone(model):
    """Layer norms away from 1 and 0, so that the adapters' place around them matters;
    BERT's pooler and classifier larger than their N(0, 0.02) init, so that its logits do."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("layer_norm" in name.lower() or "layernorm" in name.lower()) and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif "layernorm.bias" in name.lower():
                p.normal_(0, 0.1)
            elif name.startswith(("classifier.", "bert.pooler.")) and name.endswith("weight"):
                p.normal_(0, 0.5)


def make_case(name, model_class, hf_dir, io, case, config, out_dir):
    import adapters

    model = model_class.from_pretrained(hf_dir).eval()
    adapters.init(model)
    model.add_adapter(case, config=config)
    model.set_active_adapters(case)
    torch.manual_seed(11)
    params = {k: p for k, p in model.named_parameters() if f"adapters.{case}." in k or f"shared_parameters.{case}." in k}
    with torch.no_grad():
        for p in params.values():
            p.normal_(0, 0.3)
    model.save_adapter(str(out_dir / case), case, with_head=False, use_safetensors=True)
    weights = out_dir / case / "adapter.safetensors"
    saved = load_file(str(weights))
    if any(k not in saved for k in params):  # the shared rule of a T5 (see above)
        save_file({**saved, **{k: p.detach() for k, p in params.items() if k not in saved}}, str(weights))
    y = logits(model, io)
    R = torch.randn_like(y)
    names = list(params)
    grads = torch.autograd.grad((y * R).sum(), [params[k] for k in names])
    tensors = {"logits": y.detach(), "R": R}
    tensors.update({f"grad.{k}": g.contiguous() for k, g in zip(names, grads)})
    save_file(tensors, str(out_dir / f"{case}.safetensors"))


def make(out_dir: Path, shared_data: Path):
    for name, build, model_class in (("t5", t5_model, T5ForConditionalGeneration),
                                     ("bert", bert_model, BertForSequenceClassification)):
        target = out_dir / name
        target.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(3)
        model = build().eval()
        randomise_backbone(model)
        model.save_pretrained(target / "hf", safe_serialization=True)
        io = batch(name)
        save_file(io, str(target / "io.safetensors"))
        for case, config in cases().items():
            make_case(name, model_class, target / "hf", io, case, config, target)
        (target / "cases.json").write_text(json.dumps(sorted(cases())) + "\n")
