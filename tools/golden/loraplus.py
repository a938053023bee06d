"""Golden values for LoRA+ in train/trainer.hpp: the learning rate peft's
create_loraplus_optimizer gives each trainable tensor of a tiny BertModel with DoRA on query
and value (lora_A at lr; lora_B and the 1-D magnitudes at lr x ratio).

Written into out_dir: bert/ (the model, for the C++ side to load) and loraplus.json:
{"lr": ..., "ratio": ..., "lrs": {"<module path>.lora_A": lr, ...}}, the names without peft's
"base_model.model." prefix, adapter name and ".weight" suffix.
"""
import json

import torch


def make(out_dir, shared_data):
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer
    from transformers import BertConfig, BertModel

    from peft_models import BERT  # beside this file

    torch.manual_seed(0)
    bert = BertModel(BertConfig(**BERT)).eval()
    bert.save_pretrained(out_dir / "bert", safe_serialization=True)
    model = get_peft_model(bert, LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["query", "value"]))
    lr, ratio = 1e-3, 16.0
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio)
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)].removeprefix("base_model.model.").replace(".default", "").removesuffix(".weight")
            lrs[name] = group["lr"]
    (out_dir / "loraplus.json").write_text(json.dumps({"lr": lr, "ratio": ratio, "lrs": lrs}, indent=1))
