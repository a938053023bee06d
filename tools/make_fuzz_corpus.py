"""Writes the seed corpora of the libFuzzer targets in fuzz/, from the Python references where
there is one, and the files the targets load beside their input:

    python tools/make_fuzz_corpus.py --out build-sanitize/fuzz [--shared-data ../shared/data]

    <out>/corpus/<target>/     one seed file per input (the target's name is fuzz/<target>.cpp's)
    <out>/assets/              adapter weights peft and adapters saved for the tiny BERT of
                               fuzz/tiny_bert.hpp, loaded beside each fuzzed config

corpus/safetensors/ also holds the malformed files of the differential test against Python's
safetensors (tools/safetensors_differential.py): bad_* (Python refuses them) and edge_* (it
accepts them). corpus/delta_config/ is written by the target itself (tools/fuzz), since each
delta_config.json holds the C++ backbone's fingerprint.
Deterministic: the same references write the same files.
"""
import argparse
import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path

# fuzz/tiny_bert.hpp's backbone.
TINY_BERT = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                 max_position_embeddings=32, type_vocab_size=2)
# glue_tasks()'s order in include/deltatune/train/glue.hpp: fuzz/glue_tsv.cpp's first byte picks one.
GLUE_TASKS = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"]
GLUE_FOLDERS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B"}


def raw_safetensors(header, data=b"", length=None):
    """A file as bytes, the header given as JSON text (so that it may be anything)."""
    text = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def safetensors_seeds(out):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    files = {
        "floats": {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g).double(),
                   "h": torch.randn(2, 2, generator=g).half(), "bf": torch.randn(5, generator=g).bfloat16()},
        "ints": {"i64": torch.arange(6).reshape(2, 3), "i32": torch.arange(4, dtype=torch.int32),
                 "i16": torch.tensor([-1, 7], dtype=torch.int16), "i8": torch.tensor([-128, 127], dtype=torch.int8),
                 "u8": torch.tensor([0, 255], dtype=torch.uint8), "mask": torch.tensor([True, False, True])},
        "empty": {"e0": torch.zeros(0), "e03": torch.zeros(0, 3), "x": torch.ones(2)},
        "scalar": {"s": torch.tensor(1.5), "step": torch.tensor(3)},
        "none": {},
    }
    for name, tensors in files.items():
        save_file(tensors, str(out / f"{name}.safetensors"))
    save_file({"lora_A": torch.randn(2, 16, generator=g)}, str(out / "metadata.safetensors"),
              metadata={"format": "pt", "note": "seed"})
    valid = (out / "floats.safetensors").read_bytes()

    def entry(dtype, shape, begin, end):
        return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}

    bad = {
        # Bytes no tensor covers: the issue's example, Python refuses it.
        "bad_uncovered_front": raw_safetensors(json.dumps({"x": entry("U8", [1], 3, 4)}), b"abcd"),
        "bad_uncovered_tail": raw_safetensors(json.dumps({"x": entry("U8", [1], 0, 1)}), b"abcd"),
        "bad_gap": raw_safetensors(json.dumps({"x": entry("U8", [1], 0, 1), "y": entry("U8", [1], 2, 3)}), b"abc"),
        "bad_overlap": raw_safetensors(json.dumps({"x": entry("U8", [2], 0, 2), "y": entry("U8", [2], 1, 3)}), b"abc"),
        "bad_duplicate_key": raw_safetensors('{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                                             '"x":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"ab"),
        "bad_huge_shape": raw_safetensors(json.dumps({"x": entry("F32", [2**32, 2**32], 0, 4)}), b"abcd"),
        "bad_size_mismatch": raw_safetensors(json.dumps({"x": entry("F32", [2], 0, 4)}), b"abcd"),
        "bad_reversed_offsets": raw_safetensors(json.dumps({"x": entry("U8", [0], 4, 0)}), b"abcd"),
        "bad_negative_dim": raw_safetensors(json.dumps({"x": entry("U8", [-1], 0, 1)}), b"a"),
        "bad_float_dim": raw_safetensors(json.dumps({"x": entry("U8", [1.0], 0, 1)}), b"a"),
        "bad_three_offsets": raw_safetensors('{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1,1]}}', b"a"),
        "bad_unknown_dtype": raw_safetensors(json.dumps({"x": entry("F17", [1], 0, 1)}), b"a"),
        "bad_metadata_number": raw_safetensors('{"__metadata__":{"a":1}}'),
        "bad_not_object": raw_safetensors("[]"),
        "bad_not_json": raw_safetensors('x{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"a"),
        "bad_trailing_garbage": raw_safetensors('{}x'),
        "bad_non_utf8": raw_safetensors(b'{"\xff":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"a"),
        "bad_length_past_end": raw_safetensors("{}", length=100),
        "bad_length_zero": raw_safetensors("{}", length=0),
        "bad_length_huge": raw_safetensors("{}", length=2**63),
        "bad_short": b"\x02\x00\x00",
        "bad_truncated_header": valid[:20],
        "bad_truncated_data": valid[:-3],
        # Accepted by Python's safetensors, at the edges: spaces around the JSON (the writers' padding),
        # no tensors, an empty tensor of a shape whose other dimensions overflow 64 bits, a field
        # it does not know.
        "edge_padded": raw_safetensors('{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}   ', b"a"),
        "edge_zero_dim_huge_shape": raw_safetensors(json.dumps({"x": entry("F32", [0, 2**32, 2**32], 0, 0)})),
        "edge_extra_field": raw_safetensors('{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"y":1}}', b"a"),
        "edge_leading_space": raw_safetensors(' {"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"a"),
        "edge_empty_header": raw_safetensors("{}"),
        "edge_empty_tensor_past_end": raw_safetensors(json.dumps({"x": entry("F32", [0], 0, 0),
                                                                  "y": entry("U8", [1], 0, 1)}), b"a"),
    }
    for name, data in bad.items():
        (out / f"{name}.safetensors").write_bytes(data)


def config_seeds(out):
    from transformers import BertConfig, T5Config

    t5 = out / "t5_config"
    t5.mkdir()
    (t5 / "t5_v1_0.json").write_text(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                              num_heads=4, decoder_start_token_id=0).to_json_string())
    (t5 / "t5_v1_1.json").write_text(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                              num_decoder_layers=1, num_heads=4, feed_forward_proj="gated-gelu",
                                              tie_word_embeddings=False).to_json_string())
    (t5 / "t5_small.json").write_text(T5Config().to_json_string())
    bert = out / "bert_config"
    bert.mkdir()
    (bert / "tiny.json").write_text(BertConfig(**TINY_BERT).to_json_string())
    (bert / "labels.json").write_text(BertConfig(**TINY_BERT, num_labels=3, hidden_act="gelu_new",
                                                 classifier_dropout=0.2).to_json_string())
    (bert / "base.json").write_text(BertConfig().to_json_string())


def peft_seeds(out, assets):
    import torch
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    configs = {
        "lora": LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]),
        "lora_rslora_bias": LoraConfig(r=4, lora_alpha=3, use_rslora=True, bias="lora_only",
                                       target_modules=["query", "key", "value", "dense"]),
        "ia3": IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]),
    }
    corpus = out / "peft_config"
    corpus.mkdir()
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in configs.items():
            torch.manual_seed(0)
            model = get_peft_model(BertModel(BertConfig(**TINY_BERT)), config)
            model.save_pretrained(f"{tmp}/{name}")
            shutil.copy(f"{tmp}/{name}/adapter_config.json", corpus / f"{name}.json")
        (assets / "peft_lora").mkdir()
        shutil.copy(f"{tmp}/lora/adapter_model.safetensors", assets / "peft_lora")


def adapters_seeds(out, assets):
    import adapters
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    corpus = out / "adapters_config"
    corpus.mkdir()
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in {"houlsby": "double_seq_bn", "pfeiffer": "seq_bn",
                             "compacter": adapters.CompacterConfig(reduction_factor=4),
                             "pfeiffer_r4": adapters.SeqBnConfig(reduction_factor=4, non_linearity="gelu")}.items():
            torch.manual_seed(0)
            model = BertForSequenceClassification(BertConfig(**TINY_BERT))
            adapters.init(model)
            model.add_adapter(name, config=config)
            model.save_adapter(f"{tmp}/{name}", name, with_head=False, use_safetensors=True)
            shutil.copy(f"{tmp}/{name}/adapter_config.json", corpus / f"{name}.json")
        (assets / "adapters_houlsby").mkdir()
        shutil.copy(f"{tmp}/houlsby/adapter.safetensors", assets / "adapters_houlsby")


def train_state_seeds(out):
    """fuzz/train_state.cpp's parameter "w" (2x3 float32) as save_train_state lays it out."""
    import torch
    from safetensors.torch import save_file

    corpus = out / "train_state"
    corpus.mkdir()
    groups = [{"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False}]
    metadata = {"deltatune.train_state": json.dumps({"step": 3}), "deltatune.adamw_groups": json.dumps(groups)}
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    stepped = {"param/w": w, "step/w": torch.tensor(3), "exp_avg/w": w / 10, "exp_avg_sq/w": w / 100,
               "rng.cpu": torch.get_rng_state()}
    save_file(stepped, str(corpus / "stepped.safetensors"), metadata=metadata)
    save_file({"param/w": w}, str(corpus / "fresh.safetensors"), metadata=metadata)
    amsgrad = [dict(groups[0], amsgrad=True)]
    save_file(dict(stepped, **{"max_exp_avg_sq/w": w.clone()}), str(corpus / "amsgrad.safetensors"),
              metadata=dict(metadata, **{"deltatune.adamw_groups": json.dumps(amsgrad)}))


def glue_seeds(out, shared_data):
    corpus = out / "glue_tsv"
    corpus.mkdir()
    snippets = {
        "cola": "gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub.\n",
        "sst2": "sentence\tlabel\nit 's a charming journey . \t1\nunflinchingly bleak \t0\n",
        "mrpc": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe said so.\tSo he said.\n",
        "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man plays.\tA man is playing.\t4.750\n",
        "qqp": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t1\t2\tWhy?\tHow come?\t1\n",
        "mnli": "index\tsentence1\tsentence2\tgold_label\n0\tA cat sat.\tAn animal sat.\tentailment\n",
        "qnli": "index\tquestion\tsentence\tlabel\n0\tWho?\tHim.\tentailment\n",
        "rte": "index\tsentence1\tsentence2\tlabel\n0\tA dog runs.\tA dog moves.\tentailment\n",
    }
    for index, task in enumerate(GLUE_TASKS):
        (corpus / f"{task}.tsv").write_bytes(bytes([index]) + snippets[task].encode())
        real = shared_data / "glue" / GLUE_FOLDERS.get(task, "-") / "dev.tsv"
        if real.exists():  # the head of the real file: its quirks (CRLF, BOM) included
            (corpus / f"{task}_dev_head.tsv").write_bytes(bytes([index]) + b"".join(real.open("rb").readlines()[:8]))


def tokenizer_seeds(out, shared_data):
    corpus = out / "wordpiece_vocab"
    corpus.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", ",", "!", "world", "un", "##aff", "##able",
             "a", "pair", "##s"]
    (corpus / "tiny.txt").write_text("\n".join(words) + "\n")
    real = shared_data / "tokenizers" / "bert-base-uncased" / "vocab.txt"
    if real.exists():
        (corpus / "bert_head.txt").write_bytes(b"".join(real.open("rb").readlines()[:1200]))

    import sentencepiece as spm

    corpus = out / "spiece_model"
    corpus.mkdir()
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "text.txt"
        text.write_text("translate English to German: Hello world.\nThe house is wonderful.\n" * 20)
        # T5's special pieces: <pad> 0, </s> 1, <unk> 2, no <s>.
        spm.SentencePieceTrainer.train(input=str(text), model_prefix=f"{tmp}/tiny", vocab_size=40, hard_vocab_limit=False, pad_id=0,
                                       eos_id=1, unk_id=2, bos_id=-1, model_type="unigram", minloglevel=2,
                                       normalization_rule_name="identity")  # no 200 KB character map
        shutil.copy(f"{tmp}/tiny.model", corpus / "tiny.model")
    real = shared_data / "tokenizers" / "t5" / "spiece.model"
    if real.exists():
        shutil.copyfile(real, corpus / "t5.model")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shared-data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    corpus, assets = args.out / "corpus", args.out / "assets"
    # Written afresh each time: a stale seed from an older script must not linger. The targets'
    # own finds go to <out>/found/, which stays.
    for folder in (corpus, assets):
        if folder.exists():
            shutil.rmtree(folder)
    (corpus / "safetensors").mkdir(parents=True)
    assets.mkdir()
    safetensors_seeds(corpus / "safetensors")
    config_seeds(corpus)
    peft_seeds(corpus, assets)
    adapters_seeds(corpus, assets)
    train_state_seeds(corpus)
    glue_seeds(corpus, args.shared_data)
    tokenizer_seeds(corpus, args.shared_data)
    counts = {p.name: len(list(p.iterdir())) for p in sorted(corpus.iterdir())}
    print("make_fuzz_corpus:", ", ".join(f"{k} {v}" for k, v in counts.items()), file=sys.stderr)


if __name__ == "__main__":
    main()
