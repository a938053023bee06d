"""Exact-maths golden fixtures: transformers + peft computed in float64, for the C++ tests
that run deltatune in float64 too and compare at 1e-10 (tests/formats/peft_test.cpp, "[float64]").

A float32 comparison can only bound rounding; in float64 both sides agree to ~1e-14 unless
the maths differs. transformers keeps two float32 islands in T5, which would cap the float64
agreement at float32's precision; they are removed here, for these fixtures only:
  - T5LayerNorm takes its variance in float32 (hidden_states.to(torch.float32)): here in the
    input's dtype;
  - T5Attention's softmax runs on scores.float(): here `.float()` of a float64 tensor is the
    tensor itself (integer tensors, such as the relative positions, still become float32,
    as deltatune's bucketing does too).

Written into out_dir, in formats/peft.hpp's fixture layout (tools/golden/peft_models.py):
  t5/, t5_gated/, bert/  tiny random backbones (float32 folders): T5 v1.0 (ReLU, tied, 3 + 3
                         layers), T5 v1.1 (gated GELU, untied, 3 + 2 layers), BertModel
  <case>/                peft's adapter folder (float32 tensors)
  <case>.safetensors     the batch and, computed in float64 by the float64 model with the
                         adapter: the output (logits / last_hidden_state), loss and the
                         gradient of every adapter-file tensor ("grad.<key>"), all float64
Cases: t5_lora, t5_ia3, t5_prompt, t5_prefix, t5_gated_lora, bert_lora, bert_ia3, t5_dora, bert_dora,
t5_vera, bert_vera, t5_lokr (r 8: W1 and W2 full), bert_lokr (decompose_both, factor 4).
"""
import contextlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from peft_models import BERT, T5, _batch, _file_grads, _randomise  # beside this file
from t5 import randomise

T5_GATED = dict(T5, num_decoder_layers=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
BASES = {"t5": T5, "t5_gated": T5_GATED, "bert": BERT}


@contextlib.contextmanager
def without_float32_islands():
    from transformers.models.t5 import modeling_t5

    def layer_norm(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    to_float = torch.Tensor.float
    saved_norm = modeling_t5.T5LayerNorm.forward
    torch.Tensor.float = lambda self, *a, **k: self if self.dtype == torch.float64 else to_float(self, *a, **k)
    modeling_t5.T5LayerNorm.forward = layer_norm
    try:
        yield
    finally:
        torch.Tensor.float = to_float
        modeling_t5.T5LayerNorm.forward = saved_norm


def _bases(out_dir):
    from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

    for seed, (name, config) in enumerate(BASES.items()):
        torch.manual_seed(100 + seed)
        if name == "bert":
            model = BertModel(BertConfig(**config)).eval()
        else:
            model = randomise(T5ForConditionalGeneration(T5Config(**config)).eval())
        model.save_pretrained(out_dir / name, safe_serialization=True)


def _case(out_dir, name, base, config, batch, seed):
    from peft import get_peft_model
    from transformers import AutoModel, AutoModelForSeq2SeqLM

    t5 = base.startswith("t5")
    model = get_peft_model((AutoModelForSeq2SeqLM if t5 else AutoModel).from_pretrained(out_dir / base), config)
    model.eval()
    _randomise(model, seed)  # in float32, as saved: float64 holds these values exactly
    model.save_pretrained(out_dir / name)
    model.double()
    with without_float32_islands():
        if t5:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            output, loss = out.logits, out.loss
        else:
            output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            loss = (output * batch["R"].double()).sum()
        loss.backward()
    tensors = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}
    tensors["logits" if t5 else "last_hidden_state"] = output.detach()
    tensors["loss"] = loss.detach().reshape(1)
    tensors.update({f"grad.{k}": v for k, v in _file_grads(model).items()})
    assert all(v.dtype == torch.float64 for k, v in tensors.items() if k.startswith("grad."))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / f"{name}.safetensors"))


def make(out_dir: Path, shared_data: Path):
    from peft import IA3Config, LoKrConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, VeraConfig

    _bases(out_dir)
    tb, bb = _batch(21, 7, t5=True), _batch(22, 6, t5=False)
    s2s = "SEQ_2_SEQ_LM"
    _case(out_dir, "t5_lora", "t5", LoraConfig(task_type=s2s, r=2, lora_alpha=6,
                                               target_modules=["q", "k", "v", "o", "wi", "wo"]), tb, 1)
    _case(out_dir, "t5_ia3", "t5", IA3Config(task_type=s2s), tb, 2)
    _case(out_dir, "t5_prompt", "t5", PromptTuningConfig(task_type=s2s, num_virtual_tokens=3), tb, 3)
    _case(out_dir, "t5_prefix", "t5", PrefixTuningConfig(task_type=s2s, num_virtual_tokens=3,
                                                         prefix_projection=False), tb, 4)
    _case(out_dir, "t5_gated_lora", "t5_gated", LoraConfig(task_type=s2s, r=2, lora_alpha=4,
                                                           target_modules=["q", "v", "wi_0", "wi_1", "wo"]), tb, 5)
    # Every Linear of the encoder ("output.dense" is both attention.output.dense and output.dense);
    # not the pooler, which last_hidden_state does not reach.
    _case(out_dir, "bert_lora", "bert", LoraConfig(r=2, lora_alpha=4, target_modules=[
        "query", "key", "value", "intermediate.dense", "output.dense"]), bb, 6)
    _case(out_dir, "bert_ia3", "bert", IA3Config(target_modules=["key", "value", "intermediate.dense"],
                                                 feedforward_modules=["intermediate.dense"]), bb, 7)
    _case(out_dir, "t5_dora", "t5", LoraConfig(task_type=s2s, r=2, lora_alpha=6, use_dora=True,
                                               target_modules=["q", "v", "wi", "wo"]), tb, 8)
    _case(out_dir, "bert_dora", "bert", LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=[
        "query", "value", "intermediate.dense", "output.dense"]), bb, 9)
    _case(out_dir, "t5_vera", "t5", VeraConfig(task_type=s2s, r=4, projection_prng_key=3,
                                               target_modules=["q", "v", "wi", "wo"]), tb, 10)
    _case(out_dir, "bert_vera", "bert", VeraConfig(r=4, target_modules=[
        "query", "value", "intermediate.dense", "output.dense"]), bb, 11)
    _case(out_dir, "t5_lokr", "t5", LoKrConfig(task_type=s2s, r=8, alpha=4, target_modules=["q", "v", "wi", "wo"]),
          tb, 12)
    _case(out_dir, "bert_lokr", "bert", LoKrConfig(r=1, alpha=3, decompose_both=True, decompose_factor=4,
                                                   target_modules=["query", "value", "intermediate.dense",
                                                                   "output.dense"]), bb, 13)
