"""Regenerates the Unicode tables of include/deltatune/text/unicode.hpp (the part between
its "generated" markers) from what Hugging Face's tokenizers package does with each code
point, so that WordPieceTokenizer treats every code point as BertTokenizerFast does:

    ~/.cache/deltatune/venv/bin/python tools/unicode_tables.py

Not from Python's unicodedata: the Rust crates behind tokenizers' BertNormalizer and
BertPreTokenizer know punctuation, nonspacing marks and format characters as Unicode 8
did (U+2E44, punctuation since Unicode 9, is none there; U+0890, a format character since
Unicode 14, is kept), their NFD misses the decompositions added since (U+11938), while
lower-casing follows Rust's newer tables. Each step is probed
alone, one code point at a time (surrogates aside):
  whitespace, punctuation  BertPreTokenizer on "a" + c + "b" gives ["a", "b"] / ["a", c, "b"];
  dropped                  BertNormalizer's clean-up (clean_text) removes c;
  CJK                      handle_chinese_chars puts spaces around c;
  nonspacing marks         strip_accents removes c;
  stripped                 strip_accents maps c to other characters;
  lower-case               lowercase maps c to another character.
Hangul syllables are left out of the stripped table: unicode.hpp decomposes them
arithmetically, and this script checks that the probes agree. The golden fixture
tools/golden/text_unicode.py records the whole pipeline per code point for the test.
"""
import re
import sys
from pathlib import Path

from tokenizers import __version__ as tokenizers_version
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer

HEADER = Path(__file__).resolve().parent.parent / "include/deltatune/text/unicode.hpp"
CODE_POINTS = [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
SYLLABLES = range(0xAC00, 0xAC00 + 11172)


def normalizer(**step):
    """BertNormalizer with only `step` on."""
    options = dict(clean_text=False, handle_chinese_chars=False, strip_accents=False, lowercase=False)
    options.update(step)
    return BertNormalizer(**options).normalize_str


def probe():
    """Per step, the code points it touches: {cp: what it makes of chr(cp)}."""
    steps = dict(clean=normalizer(clean_text=True), cjk=normalizer(handle_chinese_chars=True),
                 strip=normalizer(strip_accents=True), lower=normalizer(lowercase=True))
    split = BertPreTokenizer().pre_tokenize_str
    out = {name: {} for name in (*steps, "split")}
    for cp in CODE_POINTS:
        c = chr(cp)
        for name, step in steps.items():
            result = step(c)
            if result != c:
                out[name][cp] = result
        words = tuple(w for w, _ in split("a" + c + "b"))
        if words != ("a" + c + "b",):
            out["split"][cp] = words
    return out


def ranges(cps):
    out = []
    for cp in sorted(cps):
        if out and out[-1][1] == cp - 1:
            out[-1][1] = cp
        else:
            out.append([cp, cp])
    return out


def lowercase_runs(lower):
    """(first, last, delta, stride): cp in [first, last] stepping by stride maps to cp + delta."""
    runs = []
    for cp, low in sorted(lower.items()):
        if len(low) != 1:
            assert cp == 0x130 and low == "i\u0307", f"U+{cp:04X} lower-cases to {low!r}: unicode.hpp expects only U+0130"
            continue
        delta = ord(low) - cp
        if runs:
            first, last, d, stride = runs[-1]
            gap = cp - last
            if d == delta and gap in (1, 2) and stride in (0, gap):
                runs[-1] = (first, cp, d, gap)
                continue
        runs.append((cp, cp, delta, 0))
    return [(f, l, d, s or 1) for f, l, d, s in runs]


def hangul(cp):
    s = cp - SYLLABLES.start
    return chr(0x1100 + s // 588) + chr(0x1161 + s % 588 // 28) + (chr(0x11A7 + s % 28) if s % 28 else "")


def stripped_runs(strip):
    """(first, last, even, odd): cp in [first, last] strips to the one character `even`
    where cp - first is even, `odd` where it is odd (which folds both runs of one target,
    A-grave..A-ring, and upper/lower pairs, A-dot-below a-dot-below ...); and (cp, c1, c2,
    c3) for the few that strip to two or three characters (0: none)."""
    single, multi = {}, []
    for cp, kept in sorted(strip.items()):
        if cp in SYLLABLES:
            assert kept == hangul(cp), f"U+{cp:04X} strips to {kept!r}, not to its arithmetic Hangul decomposition"
        elif len(kept) == 1:
            single[cp] = ord(kept)
        elif kept:
            multi.append((cp, *(ord(c) for c in kept), *([0] * (3 - len(kept)))))
    runs = []
    for cp, target in single.items():
        if runs and runs[-1][1] == cp - 1:
            first, _, even, odd = runs[-1]
            if (cp - first) % 2 == 0 and even == target:
                runs[-1] = (first, cp, even, odd)
                continue
            if (cp - first) % 2 == 1 and (cp - first == 1 or odd == target):
                runs[-1] = (first, cp, even, target)
                continue
        runs.append((cp, cp, target, target))
    return runs, multi


def table(name, kind, rows, per_line):
    lines = [f"inline constexpr {kind} {name}[] = {{"]
    for i in range(0, len(rows), per_line):
        lines.append("    " + " ".join("{" + ", ".join(f"0x{v:X}" if v >= 0 else str(v) for v in row) + "},"
                                      for row in rows[i:i + per_line]))
    return lines + ["};"]


def tables():
    p = probe()
    spaces = {cp for cp, words in p["split"].items() if words == ("a", "b")}
    punctuation = {cp for cp, words in p["split"].items() if words == ("a", chr(cp), "b")}
    assert len(spaces) + len(punctuation) == len(p["split"]), "BertPreTokenizer split a code point another way"
    dropped = {cp for cp, result in p["clean"].items() if result == ""}
    # The clean-up turns whitespace into ' ' after dropping controls: the pre-tokeniser's set serves both.
    assert {cp for cp, result in p["clean"].items() if result == " "} == spaces - dropped - {0x20}
    cjk = {cp for cp, result in p["cjk"].items() if result == f" {chr(cp)} "}
    assert len(cjk) == len(p["cjk"])
    marks = {cp for cp, result in p["strip"].items() if result == ""}
    runs, multi = stripped_runs(p["strip"])
    return [
        f"// Generated by tools/unicode_tables.py from tokenizers {tokenizers_version}.",
        *table("kWhitespace", "Range", ranges(spaces), 6),
        *table("kDropped", "Range", ranges(dropped), 6),
        *table("kPunctuation", "Range", ranges(punctuation), 6),
        *table("kCjk", "Range", ranges(cjk), 6),
        *table("kNonspacingMark", "Range", ranges(marks), 6),
        *table("kLowercase", "CaseRun", lowercase_runs(p["lower"]), 4),
        *table("kStripped", "StripRun", runs, 4),
        *table("kStrippedMulti", "StripMulti", multi, 4),
    ]


def main():
    text = HEADER.read_text()
    begin, end = "// ---- generated: tools/unicode_tables.py ----\n", "// ---- end of generated tables ----\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    assert pattern.search(text), f"{HEADER} lost its generated markers"
    HEADER.write_text(pattern.sub(lambda _: begin + "\n".join(tables()) + "\n" + end, text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
