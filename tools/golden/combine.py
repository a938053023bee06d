"""Golden values for combine_lora (methods/lora.hpp): peft's add_weighted_adapter on a tiny
BertModel with two LoRA adapters, for every combination type deltatune offers.

Inputs: task_a (r 2, alpha 4, on query and value) and task_b (r 2, alpha 6, on query and key:
the key sites have task_b alone), their values randomised, mixed with weights 0.7 and -0.4,
density 0.5 where it applies. "svd" mixes task_c and task_d (r 2, alpha 2: scaling 1), because peft
0.18.1's SVD path weights each input by w s after taking its delta weight with its scaling s
already in it (w s^2 in all), where its other paths and deltatune weight by w s; at s = 1 the
two agree.

Two changes to peft's DARE for these fixtures, both in merge_utils.random_pruning: the rescale
by 1 / density that peft 0.18.1 computes and drops (torch.div's result unused; fixed upstream,
huggingface/peft#3152), and the masks drawn from a generator seeded with 7 for each
combination, as combine_lora's `seed` draws them, rather than from the global generator, which
peft's injection of the new adapter has drawn from first.

Written into out_dir: bert/ (the base), inputs/task_a/ ... inputs/task_d/ (as peft saves them) and
<how>.safetensors: the mixed adapter's tensors under their file keys (base_model.model.<module>
.lora_A.weight, ...) and "last_hidden_state" of the batch (input_ids, attention_mask, also
saved) with the mixed adapter alone active.
"""
import contextlib

import torch
from safetensors.torch import save_file

HOWS = ["linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
SEED = 7


@contextlib.contextmanager
def _dare_as_fixed(generator):
    """peft's random_pruning with the rescale it drops, drawing from generator[0]."""
    from peft.utils import merge_utils

    def random_pruning(tensor, density, rescale):
        mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density), generator=generator[0])
        pruned = tensor * mask
        return pruned / density if rescale else pruned

    saved = merge_utils.random_pruning
    merge_utils.random_pruning = random_pruning
    try:
        yield
    finally:
        merge_utils.random_pruning = saved


def make(out_dir, shared_data):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    from peft_models import BERT, _batch, _file_key  # beside this file

    torch.manual_seed(0)
    bert = BertModel(BertConfig(**BERT)).eval()
    bert.save_pretrained(out_dir / "bert", safe_serialization=True)
    # Names that are no substring of a parameter's: peft 0.18.1 picks an adapter's tensors for
    # saving by its name's presence in their keys ("a" would take every "attention").
    inputs = {"task_a": LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]),
              "task_b": LoraConfig(r=2, lora_alpha=6, target_modules=["query", "key"]),
              "task_c": LoraConfig(r=2, lora_alpha=2, target_modules=["query", "value"]),
              "task_d": LoraConfig(r=2, lora_alpha=2, target_modules=["query", "value"])}
    model = get_peft_model(bert, inputs["task_a"], adapter_name="task_a")
    for name, config in list(inputs.items())[1:]:
        model.add_adapter(name, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(out_dir / "inputs")  # task_a/, ..., task_d/ below inputs/
    batch = _batch(14, 6, t5=False)
    generator = [None]
    for how in HOWS:
        generator[0] = torch.Generator().manual_seed(SEED)
        pair = ["task_c", "task_d"] if how == "svd" else ["task_a", "task_b"]
        with _dare_as_fixed(generator):
            model.add_weighted_adapter(pair, [0.7, -0.4], how, combination_type=how,
                                       density=0.5 if how not in ("linear", "cat", "svd") else None)
        model.set_adapter(how)
        with torch.no_grad():
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        tensors = {_file_key(n).replace(f".{how}", ""): p.detach().clone()
                   for n, p in model.named_parameters() if f".{how}." in n}
        tensors.update(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], last_hidden_state=hidden)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / f"{how}.safetensors"))
