"""Golden fixture for the normaliser and pre-tokeniser of text/wordpiece_tokenizer.hpp on
every code point: what the tokenizers package's BertNormalizer then BertPreTokenizer (the
pair BertTokenizerFast runs before WordPiece) make of "a" + c + "b", for each code point c
but the surrogates, under three settings of BertTokenizerFast: uncased (lower-case, strip
accents), cased (neither) and accents stripped without lower-casing.

Written: code_points.json, per setting, the words in compact form:
  runs: [first, last, kind], consecutive code points whose words have one of four shapes,
        kind "kept" ["a<c>b"], "dropped" ["ab"], "space" ["a", "b"], "split" ["a", "<c>", "b"];
  other: [c, words] for every code point with none of those shapes (case mapped, accent
        stripped and the like), with its words.
Needs no shared data: only the tokenizers package.
"""
import json
from pathlib import Path

SETTINGS = [
    dict(name="uncased", lowercase=True, strip_accents=True),
    dict(name="cased", lowercase=False, strip_accents=False),
    dict(name="stripped", lowercase=False, strip_accents=True),
]


def shapes(c):
    return {("a" + c + "b",): "kept", ("ab",): "dropped", ("a", "b"): "space", ("a", c, "b"): "split"}


def setting_words(setting):
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer
    normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=setting["strip_accents"],
                                lowercase=setting["lowercase"])
    pre_tokenizer = BertPreTokenizer()
    runs, other = [], []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        words = tuple(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str("a" + c + "b")))
        kind = shapes(c).get(words)
        if kind is None:
            other.append([cp, list(words)])
        elif runs and runs[-1][1] == cp - 1 and runs[-1][2] == kind:
            runs[-1][1] = cp
        else:
            runs.append([cp, cp, kind])
    return dict(setting, runs=runs, other=other)


def make(out_dir: Path, shared_data: Path):
    import tokenizers
    data = dict(tokenizers=tokenizers.__version__, settings=[setting_words(s) for s in SETTINGS])
    (out_dir / "code_points.json").write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")))
