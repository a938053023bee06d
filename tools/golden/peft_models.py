"""Whole-model golden fixtures for formats/peft.hpp: tiny random T5 and BERT models wrapped
by peft itself, their adapters saved with peft's save_pretrained, and the outputs and
delta gradients of a fixed batch.

Written into out_dir:
  t5/                  T5ForConditionalGeneration (3 + 3 layers: peft's prefix tuning pairs
                       decoder layer i with key/value block 2i mod L, a permutation only for odd L)
  t5_3_2/              the same with 3 encoder and 2 decoder layers: peft's num_layers L is the
                       encoder's 3, so decoder layers 0 and 1 read pairs 0 and 2, and pair 1 none
  bert/                BertModel (no task head, so peft adds no modules_to_save)
  <case>/              peft's adapter folder: adapter_config.json, adapter_model.safetensors
  <case>.safetensors   input_ids, attention_mask, labels (T5), R (BERT: the cotangent of
                       last_hidden_state), the reference's logits / last_hidden_state, loss,
                       and "grad.<key>" for every tensor of the adapter file, under its file key
Cases: t5_lora, t5_rslora (on q, k, v, o, wi, wo, not the default q, v), t5_ia3, t5_prompt,
t5_prefix (the table trained directly: prefix_projection false), t5_prefix_3_2 (on t5_3_2),
bert_lora, t5_dora and bert_dora (use_dora=True; BERT's Linears have biases, which DoRA's
output leaves out of its rescaling), t5_pissa and bert_olora (init_lora_weights "pissa" /
"olora"; their <case>.safetensors also hold the initial state: "init.<key>", "init_grad.<key>"
and "stepped.<loss|output>" after one SGD step at lr 0.1 from it), t5_vera (q, v, wo: the shared
projections sized by wo's 64 inputs), bert_vera_seed (save_projection false: the file holds the
vectors only, the projections being drawn again from the seed), t5_lokr (W2 low-rank; wo's W1 not
square) and bert_lokr (decompose_both, decompose_factor 4: both factors low-rank).
Also lokr_factorization.safetensors: peft's factorization(dimension, factor) for dimensions 1 to
1100 and factors -1, 1, 3, 4, 8, 64 ("dimension", "factor", "m", "n").
Delta values are randomised after peft's init (LoRA's B is zero, IA3's l and DoRA's magnitude
near one: any value serves, the formulas are checked, not the init).
The T5 loss is the LM cross-entropy on labels; BERT's is sum(last_hidden_state * R) over the tokens.
"""
from pathlib import Path

import torch
from safetensors.torch import save_file

T5 = dict(vocab_size=100, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=3, num_decoder_layers=3,
          relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="relu",
          tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, type_vocab_size=2)


def _base_models(out_dir):
    from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

    from t5 import randomise  # tools/golden/t5.py, beside this file

    torch.manual_seed(0)
    t5 = randomise(T5ForConditionalGeneration(T5Config(**T5)).eval())
    t5.save_pretrained(out_dir / "t5", safe_serialization=True)
    bert = BertModel(BertConfig(**BERT)).eval()
    bert.save_pretrained(out_dir / "bert", safe_serialization=True)
    t5_3_2 = randomise(T5ForConditionalGeneration(T5Config(**dict(T5, num_decoder_layers=2))).eval())
    t5_3_2.save_pretrained(out_dir / "t5_3_2", safe_serialization=True)


def _batch(seed, length, t5):
    """Two sequences, the second right-padded; T5 labels (one ignored) or BERT's cotangent R."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, 100, (2, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, length - 2:] = 0
    input_ids[attention_mask == 0] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if t5:
        batch["labels"] = torch.randint(2, 100, (2, 4), generator=g)
        batch["labels"][1, 3] = -100
    else:
        batch["R"] = torch.randn(2, length, 32, generator=g)
    return batch


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                centre = 1.0 if "ia3_l" in name or "lora_magnitude_vector" in name else 0.0
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + centre)


def _file_key(name):
    """A peft parameter's adapter-file key: peft's name without the adapter name; prompt and
    prefix tables are prompt_embeddings; DoRA's magnitude parameter,
    lora_magnitude_vector.default.weight, is saved as lora_magnitude_vector."""
    if name.startswith("prompt_encoder."):
        return "prompt_embeddings"
    return name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def _file_grads(model):
    """The gradient of every adapter-file tensor, under its file key."""
    return {_file_key(name): p.grad for name, p in model.named_parameters() if p.grad is not None}


def _initial_state(model, batch, run):
    """PiSSA / OLoRA: peft's initial factors ("init.<key>"), the gradients there
    ("init_grad.<key>"), and the loss and output after one SGD step (lr 0.1) from them
    ("stepped.<name>"); the model is left stepped, its gradients cleared."""
    out = run(model, batch)
    out["loss"].backward()
    tensors = {f"init.{_file_key(n)}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tensors.update({f"init_grad.{k}": g.clone() for k, g in _file_grads(model).items()})
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.zero_grad()
    with torch.no_grad():
        stepped = run(model, batch)
    tensors.update({f"stepped.{k}": v.reshape(-1) if k == "loss" else v for k, v in stepped.items()})
    return tensors


def _case(out_dir, name, base_dir, config, batch, run, seed):
    """Wraps the base in base_dir with peft, randomises the delta, saves the adapter and
    <name>.safetensors; returns the peft model, its gradients in place. An initialisation
    that reads the weights (PiSSA, OLoRA) has its initial state recorded first."""
    from peft import get_peft_model
    from transformers import AutoModel, AutoModelForSeq2SeqLM

    loader = AutoModelForSeq2SeqLM if name.startswith("t5") else AutoModel
    model = get_peft_model(loader.from_pretrained(base_dir), config)
    model.eval()  # no dropout; gradients still flow
    initial = _initial_state(model, batch, run) if getattr(config, "init_lora_weights", True) in ("pissa", "olora") else {}
    _randomise(model, seed)
    model.save_pretrained(out_dir / name)
    out = run(model, batch)
    out["loss"].backward()
    tensors = dict(batch, **initial)
    tensors.update({k: v.detach() for k, v in out.items()})
    tensors["loss"] = tensors["loss"].reshape(1)
    tensors.update({f"grad.{k}": v for k, v in _file_grads(model).items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / f"{name}.safetensors"))
    return model


def _run_t5(model, b):
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    return {"logits": out.logits, "loss": out.loss}


def _run_bert(model, b):
    hidden = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    # A prompt's P leading positions are left out of the loss: R covers the tokens.
    return {"last_hidden_state": hidden, "loss": (hidden[:, -b["R"].shape[1]:] * b["R"]).sum()}


def make(out_dir: Path, shared_data: Path):
    from peft import IA3Config, LoKrConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, VeraConfig

    _base_models(out_dir)
    t5, bert = out_dir / "t5", out_dir / "bert"
    tb, bb = _batch(11, 7, t5=True), _batch(12, 6, t5=False)
    s2s = "SEQ_2_SEQ_LM"
    _case(out_dir, "t5_lora", t5, LoraConfig(task_type=s2s, r=2, lora_alpha=6), tb, _run_t5, 1)
    _case(out_dir, "t5_rslora", t5, LoraConfig(task_type=s2s, r=4, lora_alpha=3, use_rslora=True,
                                               target_modules=["q", "k", "v", "o", "wi", "wo"]), tb, _run_t5, 2)
    _case(out_dir, "t5_ia3", t5, IA3Config(task_type=s2s), tb, _run_t5, 3)
    _case(out_dir, "t5_prompt", t5, PromptTuningConfig(task_type=s2s, num_virtual_tokens=3), tb, _run_t5, 4)
    _case(out_dir, "t5_prefix", t5, PrefixTuningConfig(task_type=s2s, num_virtual_tokens=3, prefix_projection=False),
          tb, _run_t5, 5)
    _case(out_dir, "t5_prefix_3_2", out_dir / "t5_3_2",
          PrefixTuningConfig(task_type=s2s, num_virtual_tokens=3, prefix_projection=False), tb, _run_t5, 7)
    _case(out_dir, "bert_lora", bert, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]), bb,
          _run_bert, 6)
    _case(out_dir, "t5_dora", t5, LoraConfig(task_type=s2s, r=2, lora_alpha=6, use_dora=True,
                                             target_modules=["q", "v", "wo"]), tb, _run_t5, 8)
    # query and value only: save_peft writes the feed-forward's "dense" layers as full paths
    # (their last names are shared), which the config comparison would see; float64.py has them.
    _case(out_dir, "bert_dora", bert, LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["query", "value"]),
          bb, _run_bert, 9)
    # The frozen weights replaced by their residual (peft's pissa_init / olora_init); saved
    # without conversion, as peft saves by default: loading redoes the decomposition.
    _case(out_dir, "t5_pissa", t5, LoraConfig(task_type=s2s, r=2, lora_alpha=6, init_lora_weights="pissa",
                                              target_modules=["q", "v", "wo"]), tb, _run_t5, 10)
    _case(out_dir, "bert_olora", bert, LoraConfig(r=2, lora_alpha=4, init_lora_weights="olora",
                                                  target_modules=["query", "value"]), bb, _run_bert, 11)
    # VeRA: wo (64 in) makes the shared A wider than q and v read; BERT saves only the seed.
    _case(out_dir, "t5_vera", t5, VeraConfig(task_type=s2s, r=4, projection_prng_key=3, d_initial=0.2,
                                             target_modules=["q", "v", "wo"]), tb, _run_t5, 12)
    _case(out_dir, "bert_vera_seed", bert, VeraConfig(r=4, projection_prng_key=5, save_projection=False,
                                                      target_modules=["query", "value"]), bb, _run_bert, 13)
    # LoKr: T5's 32 x 32 layers split as (4, 8) x (4, 8), wo's 32 x 64 as (4, 8) x (8, 8); r 2 is
    # under half of W2's 8, so W2 is low-rank. BERT: both factors low-rank at factor 4.
    _case(out_dir, "t5_lokr", t5, LoKrConfig(task_type=s2s, r=2, alpha=3, target_modules=["q", "v", "wo"]), tb,
          _run_t5, 14)
    _case(out_dir, "bert_lokr", bert, LoKrConfig(r=1, alpha=2, decompose_both=True, decompose_factor=4,
                                                 target_modules=["query", "value"]), bb, _run_bert, 15)
    _factorizations(out_dir)


def _factorizations(out_dir):
    """peft's factorization for every dimension up to 1100 (768, 1024 among them) at several factors."""
    from peft.tuners.lokr.layer import factorization

    rows = [(d, f, *factorization(d, f)) for f in (-1, 1, 3, 4, 8, 64) for d in range(1, 1101)]
    table = torch.tensor(rows, dtype=torch.int64)
    save_file({name: table[:, i].contiguous() for i, name in enumerate(["dimension", "factor", "m", "n"])},
              str(out_dir / "lokr_factorization.safetensors"))
