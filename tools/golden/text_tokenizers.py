"""Golden fixture for text/sentencepiece_tokenizer.hpp and text/wordpiece_tokenizer.hpp:
transformers' T5Tokenizer / T5TokenizerFast (from the T5 spiece.model) and BertTokenizerFast
(from bert-base-uncased's vocab.txt) on GLUE dev sentences and hand-written hard cases.
(Named text_tokenizers, not tokenizers: make_fixtures.py puts this folder first on sys.path,
where a tokenizers.py would hide the tokenizers package.)

Both the vocabularies and GLUE live in the shared data folder, so nothing here can be made
without it: then only NOTE.txt is written and the C++ golden cases report themselves skipped.
Written: cases.json with, per tokenizer, single encodings (ids, segment ids), batches
(padding, truncation), decodings, and the texts where transformers' slow and fast
tokenizers disagree. The C++ T5Tokenizer encodes through libsentencepiece, as the slow
T5Tokenizer does, so T5's encodings come from that one (they differ from the fast one on
a few sequences of combining marks) and its decodings from the fast one; BERT's all come
from BertTokenizerFast.
"""
import json
import shutil
import tempfile
from pathlib import Path

GLUE_ROWS = 150  # per GLUE file, from the top
HARD_CASES = [
    "",
    " ",
    "Hello world",
    "Hello, world! How are you?",
    "  multiple   spaces   inside  ",
    "tabs\tand\nnewlines\r\nand\u000bvertical\u000cfeeds",
    "Café naïve résumé Ångström Øresund façade coöperate",
    "Ünïcödé ÀÁÂÃÄÅ àáâãäå ÇçÑñ ŁłŒœ ß ẞ",
    "İstanbul ıi ΟΔΟΣ Σίσυφος ἀρετή Москва Ёлка Їжак",
    "日本語のテキスト、がぎぐげご。中文句子：我爱北京天安门！",
    "한국어 문장입니다",
    "emoji 😀👍🏽🇩🇪 and ❤️ text",
    "punctuation!!! ??? ... --- ((( ))) \"quoted\" 'single' `back`",
    "a.b,c;d:e!f?g",
    "$100 + 50% = #1 @home ^caret ~tilde |pipe| <angle> {brace} [bracket] \\slash/",
    "numbers 1234567890 3.14159 1,000,000 1e-10 0x1F",
    "supercalifragilisticexpialidocious " + "pneumonoultramicroscopicsilicovolcanoconiosis",
    "x" * 120,
    "a" * 99 + " " + "b" * 101,
    "control\u0000chars\u0001here\u007f\u0085and\u200bzero\u00adwidth\u2028line\ue000private",
    "don't can't won't it's I'm you're we've",
    "The <extra_id_0> sat on the <extra_id_1> mat </s> after",
    "<pad><unk></s><extra_id_99><extra_id_100>",
    "hello [SEP] world [MASK] [CLS] [cls] [PAD][UNK]",
    "fullwidth Ｈｅｌｌｏ ｗｏｒｌｄ １２３",
    "ligatures ﬁ ﬂ and roman Ⅻ circled ⓐ Ⓐ",
    "Kelvin \u212a Ohm \u2126 Angstrom \u212b",
    "combining a\u0301 e\u0308 n\u0303 o\u0302\u0323",
    "Ǆ ǅ ǆ ŉ ǰ ΐ",
    "हिन्दी पाठ and العربية نص and עברית",
    "ไทย ภาษา",
    "mixedCASE camelCase SHOUTING",
    "URL https://example.com/path?q=1&r=2 email a.b@c.org",
    "\u00a0non\u00a0breaking\u3000ideographic\u2003em space",
    "trailing space ",
    " leading space",
]
HARD_PAIRS = [
    ("", "Only a second sentence."),  # not ("x", ""): transformers takes an empty text_pair for none
    ("Short.", "A much longer second sentence that will need to be truncated first, surely."),
    ("A much longer first sentence that will need to be truncated first, surely.", "Short."),
    ("Equal length one two three", "Equal length four five six"),
    ("Café", "日本語"),
]


def glue_sentences(shared):
    glue = shared / "glue"
    sst = [line.split("\t")[0] for line in (glue / "SST-2/dev.tsv").read_text().splitlines()[1:]]
    cola = [line.split("\t")[3] for line in (glue / "CoLA/dev.tsv").read_text().splitlines()]
    mrpc = [line.split("\t") for line in (glue / "MRPC/dev.tsv").read_text(encoding="utf-8-sig").splitlines()[1:]]
    singles = sst[:GLUE_ROWS] + cola[:GLUE_ROWS] + [row[3] for row in mrpc[:GLUE_ROWS]]
    pairs = [(row[3], row[4]) for row in mrpc[:GLUE_ROWS]]
    return singles, pairs


def from_folder(cls, source):
    """A transformers tokenizer from_pretrained on a temporary folder holding just `source`."""
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(source, folder)
        return cls.from_pretrained(folder)


def batches(texts, pairs, max_lengths):
    """Groups of 8, cycling through padding to the longest (no limit / a limit) and to max_length."""
    out = []
    for start in range(0, len(texts), 8):
        i = start // 8
        max_length = max_lengths[i % len(max_lengths)]
        padding = "max_length" if i % 3 == 2 else "longest"
        out.append(dict(texts=texts[start:start + 8], pairs=pairs[start:start + 8] if pairs else None,
                        max_length=max_length, padding=padding))
    return out


def encode_batch(tok, batch, with_types):
    kwargs = dict(padding=batch["padding"])
    if batch["max_length"]:
        kwargs.update(max_length=batch["max_length"], truncation="longest_first")
    if batch["pairs"] is None:
        enc = tok(batch["texts"], **kwargs)
    else:
        enc = tok(batch["texts"], batch["pairs"], **kwargs)
    batch = {k: v for k, v in batch.items() if v is not None}
    batch.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    if with_types:
        batch.update(token_type_ids=enc["token_type_ids"])
    return batch


def t5_cases(spiece, singles):
    from transformers import T5Tokenizer, T5TokenizerFast
    fast = from_folder(T5TokenizerFast, spiece)
    slow = from_folder(T5Tokenizer, spiece)
    encode = [dict(text=t, ids=slow(t)["input_ids"]) for t in singles]
    fast_disagrees = [c["text"] for c in encode if fast(c["text"])["input_ids"] != c["ids"]]
    decode = [dict(ids=c["ids"], skip_special_tokens=True, text=fast.decode(c["ids"], skip_special_tokens=True))
              for c in encode]
    decode += [dict(ids=c["ids"], skip_special_tokens=False, text=fast.decode(c["ids"])) for c in encode[:60]]
    batch = [encode_batch(slow, b, with_types=False) for b in batches(singles, None, [0, 16, 24])]
    return dict(vocab_size=len(fast), encode=encode, decode=decode, batch=batch, fast_disagrees=fast_disagrees)


def bert_cases(vocab, singles, pairs):
    from transformers import BertTokenizer, BertTokenizerFast
    fast = from_folder(BertTokenizerFast, vocab)
    slow = from_folder(BertTokenizer, vocab)
    encode = []
    for t in singles:
        enc = fast(t)
        encode.append(dict(text=t, ids=enc["input_ids"], type_ids=enc["token_type_ids"]))
    for a, b in pairs:
        enc = fast(a, b)
        encode.append(dict(text=a, pair=b, ids=enc["input_ids"], type_ids=enc["token_type_ids"]))
    slow_disagrees = [c["text"] for c in encode
                      if (slow(c["text"], c["pair"]) if "pair" in c else slow(c["text"]))["input_ids"] != c["ids"]]
    decode = [dict(ids=c["ids"], skip_special_tokens=True, text=fast.decode(c["ids"], skip_special_tokens=True))
              for c in encode]
    decode += [dict(ids=c["ids"], skip_special_tokens=False, text=fast.decode(c["ids"])) for c in encode[:60]]
    batch = [encode_batch(fast, b, with_types=True) for b in batches(singles, None, [0, 16, 24])]
    firsts, seconds = [a for a, _ in pairs], [b for _, b in pairs]
    batch += [encode_batch(fast, b, with_types=True) for b in batches(firsts, seconds, [0, 24, 40])]
    return dict(vocab_size=len(fast), encode=encode, decode=decode, batch=batch, slow_disagrees=slow_disagrees)


def make(out_dir: Path, shared_data: Path):
    spiece = shared_data / "tokenizers/t5/spiece.model"
    vocab = shared_data / "tokenizers/bert-base-uncased/vocab.txt"
    cases = out_dir / "cases.json"
    cases.unlink(missing_ok=True)
    needed = [spiece, vocab, shared_data / "glue"]
    if not all(p.exists() for p in needed):
        (out_dir / "NOTE.txt").write_text(
            f"tokenizer fixtures skipped: the shared data ({', '.join(map(str, needed))}) is not all there\n")
        return
    (out_dir / "NOTE.txt").unlink(missing_ok=True)
    glue_singles, glue_pairs = glue_sentences(shared_data)
    singles = HARD_CASES + glue_singles
    pairs = HARD_PAIRS + glue_pairs
    data = dict(t5=t5_cases(spiece, singles), bert=bert_cases(vocab, singles, pairs))
    cases.write_text(json.dumps(data, ensure_ascii=False, indent=None))
