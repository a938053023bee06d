"""Layer-level golden values for deltatune's methods, from the references themselves:
peft (LoRA, IA3, prompt, prefix) and adapters (Houlsby and Pfeiffer adapters, PHM and
Compacter layers). Tiny shapes, fixed seeds. Each case writes <case>.safetensors holding
the input x, a fixed cotangent R, the reference's output y and the gradients of
sum(y * R), with every tensor renamed to deltatune's parameter names ("param.<name>",
"grad.<name>") so the C++ side loads them name to name.

Deliberate differences, compared against the corrected behaviour:
- adapters 1.3.0 initialises PHM weights with xavier_normal whatever the config asks;
  the values here are set explicitly after construction, so init does not enter.
- Compacter's rule A shared across layers: adapters keeps it in a ForwardContext; here
  both PHM layers of one adapter own a copy of the same A, and the gradient of the shared
  A is the sum of the two copies' gradients (what sharing means).
"""
from pathlib import Path

import torch
from safetensors.torch import save_file


def _save(out_dir, case, x, y, R, params, grads, extra=None):
    tensors = {"x": x, "y": y.detach(), "R": R}
    tensors.update({f"param.{k}": v.detach().clone().contiguous() for k, v in params.items()})
    tensors.update({f"grad.{k}": v.detach().clone().contiguous() for k, v in grads.items()})
    tensors.update(extra or {})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / f"{case}.safetensors"))


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.k = torch.nn.Linear(8, 6)
        self.wo = torch.nn.Linear(8, 6)

    def forward(self, x):
        return self.k(x) + self.wo(x)


def _lora(out_dir, case, use_rslora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(_Tiny(), LoraConfig(r=2, lora_alpha=4, target_modules=["k"], use_rslora=use_rslora))
    layer = model.base_model.model.k
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(3, 4, 8)
    y = layer(x)
    R = torch.randn_like(y)
    (y * R).sum().backward()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    _save(out_dir, case, x, y, R, {"lora_A": A, "lora_B": B}, {"lora_A": A.grad, "lora_B": B.grad},
          {"base.weight": layer.base_layer.weight.detach(), "base.bias": layer.base_layer.bias.detach()})


def _ia3(out_dir):
    from peft import IA3Config, get_peft_model

    torch.manual_seed(2)
    model = get_peft_model(_Tiny(), IA3Config(target_modules=["k", "wo"], feedforward_modules=["wo"]))
    for name in ("k", "wo"):
        layer = getattr(model.base_model.model, name)
        with torch.no_grad():
            layer.ia3_l["default"].uniform_(0.5, 1.5)
        x = torch.randn(3, 4, 8)
        y = layer(x)
        R = torch.randn_like(y)
        (y * R).sum().backward()
        l = layer.ia3_l["default"]
        _save(out_dir, f"ia3_{name}", x, y, R, {"ia3_l": l.reshape(-1)}, {"ia3_l": l.grad.reshape(-1)},
              {"base.weight": layer.base_layer.weight.detach(), "base.bias": layer.base_layer.bias.detach()})


def _adapter_case(out_dir, case, config, names):
    """An adapters Adapter module on a sublayer of width 16 with a LayerNorm: pre_forward,
    forward, post_forward as bottleneck_layer_forward runs them for one active adapter."""
    from adapters.methods.modeling import Adapter

    torch.manual_seed(3)
    d = 16
    adapter = Adapter("a", d, d // config["reduction_factor"], config)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.3)
    h, y, R, extra = _run_sublayer(adapter, d)
    params = dict(adapter.named_parameters())
    _save(out_dir, case, h, y, R, {ours: params[theirs] for theirs, ours in names.items()},
          {ours: params[theirs].grad for theirs, ours in names.items()}, extra)


def _run_sublayer(adapter, d):
    """The sublayer's end with one active adapter, as adapters' bottleneck_layer_forward
    runs it: pre_forward, forward, post_forward, around a LayerNorm; backward of sum(y * R)."""
    layer_norm = torch.nn.LayerNorm(d)
    with torch.no_grad():
        layer_norm.weight.normal_(1, 0.1)
        layer_norm.bias.normal_(0, 0.1)
    h, residual = torch.randn(2, 3, d), torch.randn(2, 3, d)
    hidden, _, adapter_residual = adapter.pre_forward(h, residual, layer_norm)
    out, _, _ = adapter(hidden, residual_input=adapter_residual)
    y = adapter.post_forward(out, h, residual, layer_norm)
    R = torch.randn_like(y)
    (y * R).sum().backward()
    return h, y, R, {"residual": residual, "ln.weight": layer_norm.weight.detach(), "ln.bias": layer_norm.bias.detach()}


LINEAR_NAMES = {"adapter_down.0.weight": "adapter_down.weight", "adapter_down.0.bias": "adapter_down.bias",
                "adapter_up.weight": "adapter_up.weight", "adapter_up.bias": "adapter_up.bias"}


def _adapters(out_dir):
    from adapters import DoubleSeqBnConfig, SeqBnConfig

    _adapter_case(out_dir, "houlsby", DoubleSeqBnConfig(reduction_factor=4, non_linearity="gelu", init_weights="houlsby"),
                  LINEAR_NAMES)
    _adapter_case(out_dir, "pfeiffer", SeqBnConfig(reduction_factor=4, init_weights="houlsby"), LINEAR_NAMES)
    phm = {"phm_layer": True, "phm_dim": 2, "shared_phm_rule": False, "factorized_phm_W": False}
    _adapter_case(out_dir, "phm_adapter", DoubleSeqBnConfig(reduction_factor=4, non_linearity="gelu", **phm),
                  {"adapter_down.0.W": "adapter_down.W", "adapter_down.0.b": "adapter_down.b",
                   "adapter_down.0.phm_rule": "adapter_down.phm_rule", "adapter_up.W": "adapter_up.W",
                   "adapter_up.b": "adapter_up.b", "adapter_up.phm_rule": "adapter_up.phm_rule"})


def _compacter(out_dir, case, config_class):
    """Compacter(++) with one rule A: the reference's PHM layers, each given the same A."""
    from adapters.methods.modeling import Adapter

    config = config_class(reduction_factor=2, phm_dim=4, shared_phm_rule=False)  # factorized_phm_W, rank 1
    torch.manual_seed(4)
    d = 16
    adapter = Adapter("a", d, d // 2, config)
    A = torch.randn(4, 4, 4) * 0.3
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            p.copy_(A if name.endswith("phm_rule") else torch.randn_like(p) * 0.3)
    h, y, R, extra = _run_sublayer(adapter, d)
    p = dict(adapter.named_parameters())
    names = {"adapter_down.0.W_left": "adapter_down.W_left", "adapter_down.0.W_right": "adapter_down.W_right",
             "adapter_down.0.b": "adapter_down.b", "adapter_up.W_left": "adapter_up.W_left",
             "adapter_up.W_right": "adapter_up.W_right", "adapter_up.b": "adapter_up.b"}
    params = {ours: p[theirs] for theirs, ours in names.items()}
    grads = {ours: p[theirs].grad for theirs, ours in names.items()}
    params["shared.phm_rule"] = A
    grads["shared.phm_rule"] = p["adapter_down.0.phm_rule"].grad + p["adapter_up.phm_rule"].grad
    _save(out_dir, case, h, y, R, params, grads, extra)


def _prefix(out_dir):
    from peft import PrefixTuningConfig
    from peft.tuners.prefix_tuning.model import PrefixEncoder

    torch.manual_seed(5)
    config = PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, token_dim=8, num_layers=3,
                                num_attention_heads=2, encoder_hidden_size=10, prefix_projection=True)
    encoder = PrefixEncoder(config)
    prefix = torch.arange(3).unsqueeze(0)
    y = encoder(prefix)[0]  # (P, layers * 2 * token_dim)
    R = torch.randn_like(y)
    (y * R).sum().backward()
    p = dict(encoder.named_parameters())
    names = {"embedding.weight": "embedding", "transform.0.weight": "transform.0.weight",
             "transform.0.bias": "transform.0.bias", "transform.2.weight": "transform.2.weight",
             "transform.2.bias": "transform.2.bias"}
    _save(out_dir, "prefix", prefix.float(), y, R, {o: p[t] for t, o in names.items()},
          {o: p[t].grad for t, o in names.items()})


def _prompt(out_dir):
    from peft import PromptTuningConfig, PromptTuningInit
    from peft.tuners.prompt_tuning.model import PromptEmbedding

    torch.manual_seed(6)
    vocabulary = torch.nn.Embedding(20, 8)
    config = PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4, token_dim=8, num_transformer_submodules=1,
                                prompt_tuning_init=PromptTuningInit.RANDOM)
    prompt = PromptEmbedding(config, vocabulary)
    y = prompt(torch.arange(4).unsqueeze(0))[0]
    R = torch.randn_like(y)
    (y * R).sum().backward()
    w = prompt.embedding.weight
    _save(out_dir, "prompt", torch.arange(4).float(), y, R, {"embedding": w}, {"embedding": w.grad})


def make(out_dir: Path, shared_data: Path):
    _lora(out_dir, "lora", use_rslora=False)
    _lora(out_dir, "rslora", use_rslora=True)
    _ia3(out_dir)
    _adapters(out_dir)
    from adapters import CompacterConfig, CompacterPlusPlusConfig

    _compacter(out_dir, "compacter", CompacterConfig)
    _compacter(out_dir, "compacter_pp", CompacterPlusPlusConfig)
    _prefix(out_dir)
    _prompt(out_dir)
