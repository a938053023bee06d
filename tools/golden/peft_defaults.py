"""Golden fixtures for DeltaModel::add's default sites (each method's recipe, methods/<name>.hpp): what peft's
get_peft_model does with each method's default config on tiny random T5 and BERT.

One row per (backbone, method): t5_/bert_ x lora, ia3, prompt, prefix, each peft's config
with no target modules given (prompt and prefix: 3 virtual tokens; their task types,
SEQ_2_SEQ_LM for T5 and FEATURE_EXTRACTION for the bare BertModel, are what make peft
feed them in). The base models are peft_models.py's (T5 3 + 3 layers, BERT 2 layers).

Written into out_dir, beside t5/ and bert/:
  <row>/              peft's adapter folder (the randomised delta)
  <row>.safetensors   the batch, the reference's logits / last_hidden_state and loss, and
                      "grad.<key>" for every tensor of the adapter file (peft_models.py's layout)
  <row>.json          sites: the module paths peft adapts (LoRA, IA3: its tuner layers; prompt:
                      the module whose inputs_embeds grew; prefix: the attention layers whose
                      keys grew, found with output_attentions); feedforward (IA3): those of them
                      that scale their input; trainable: peft's trainable
                      parameter count; read: how many of them its forward reads (peft's
                      SEQ_2_SEQ_LM prompt holds 2P rows and feeds the first P to the encoder)
"""
import json

import torch

from peft_models import _base_models, _batch, _case, _run_bert, _run_t5

P = 3  # virtual tokens


def _configs():
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    s2s, fe = "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION"
    return {
        "t5_lora": LoraConfig(task_type=s2s), "t5_ia3": IA3Config(task_type=s2s),
        "t5_prompt": PromptTuningConfig(task_type=s2s, num_virtual_tokens=P),
        "t5_prefix": PrefixTuningConfig(task_type=s2s, num_virtual_tokens=P),
        "bert_lora": LoraConfig(), "bert_ia3": IA3Config(),
        "bert_prompt": PromptTuningConfig(task_type=fe, num_virtual_tokens=P),
        "bert_prefix": PrefixTuningConfig(task_type=fe, num_virtual_tokens=P),
    }


def _tuner_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    prefix = "base_model.model."
    return [n[len(prefix):] for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def _prompt_sites(model, batch, run, t5):
    """The modules among T5's encoder and decoder (BERT: its embeddings) whose inputs_embeds
    come in longer than the batch."""
    base = model.get_base_model()
    candidates = {"encoder": base.encoder, "decoder": base.decoder} if t5 else {"embeddings": base.embeddings}
    grown, length = [], batch["input_ids"].shape[1]
    hooks = [m.register_forward_pre_hook(
        lambda _, args, kwargs, name=name: grown.append(name)
        if kwargs.get("inputs_embeds") is not None and kwargs["inputs_embeds"].shape[1] > length else None,
        with_kwargs=True) for name, m in candidates.items()]
    with torch.no_grad():
        run(model, batch)
    for h in hooks:
        h.remove()
    return sorted(set(grown))


def _prefix_sites(model, batch, t5):
    """The attention layers whose attention weights span more keys than the plain model's."""
    base = model.get_base_model()
    with torch.no_grad():
        if t5:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                        output_attentions=True)
            with model.disable_adapter():
                plain = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"], output_attentions=True)
            kinds = [("encoder_attentions", "encoder.block.{}.layer.0.SelfAttention"),
                     ("decoder_attentions", "decoder.block.{}.layer.0.SelfAttention"),
                     ("cross_attentions", "decoder.block.{}.layer.1.EncDecAttention")]
        else:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
            plain = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
            kinds = [("attentions", "encoder.layer.{}.attention.self")]
    return [name.format(i) for field, name in kinds
            for i, (a, b) in enumerate(zip(getattr(out, field), getattr(plain, field))) if a.shape[-1] > b.shape[-1]]


def make(out_dir, shared_data):
    _base_models(out_dir)
    batches = {True: _batch(11, 7, t5=True), False: _batch(12, 6, t5=False)}
    for seed, (row, config) in enumerate(_configs().items(), start=21):
        t5 = row.startswith("t5")
        batch, run = batches[t5], _run_t5 if t5 else _run_bert
        model = _case(out_dir, row, out_dir / ("t5" if t5 else "bert"), config, batch, run, seed)
        method = row.split("_", 1)[1]
        sites = {"lora": lambda: _tuner_layers(model), "ia3": lambda: _tuner_layers(model),
                 "prompt": lambda: _prompt_sites(model, batch, run, t5),
                 "prefix": lambda: _prefix_sites(model, batch, t5)}[method]()
        trainable = model.get_nb_trainable_parameters()[0]
        unread = trainable // 2 if method == "prompt" and config.num_transformer_submodules == 2 else 0
        info = {"sites": sites, "trainable": trainable, "read": trainable - unread}
        if method == "ia3":
            info["feedforward"] = [n for n, m in model.base_model.model.named_modules() if getattr(m, "is_feedforward", False)]
        (out_dir / f"{row}.json").write_text(json.dumps(info, indent=1) + "\n")
