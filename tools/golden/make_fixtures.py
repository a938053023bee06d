"""Writes the golden fixtures the C++ tests compare against, from the reference
implementations (transformers, peft, adapters, tokenizers) in the venv set up by
`tools/setup --peers`. ctest runs it first (fixture `golden`); anyone can rerun it:

    python tools/golden/make_fixtures.py --out build/golden [--only NAME ...]

Each module tools/golden/<name>.py beside this one defines `make(out_dir, shared_data)`
and writes into out_dir/<name>/. A module is rerun only when its source or the
reference versions changed (a stamp file records them). Where the references are not
installed, it writes out_dir/UNAVAILABLE with the reason and exits 0: the tests that
need fixtures then report themselves skipped.
"""
import argparse
import hashlib
import importlib
import importlib.metadata
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REFERENCES = ("torch", "transformers", "peft", "adapters", "tokenizers", "safetensors")


def reference_versions():
    versions = []
    for name in REFERENCES:
        try:
            versions.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} absent")
    return versions


def sources(name, seen=None):
    """The module's source and those of the sibling modules it imports (peft_defaults.py
    builds on peft_models.py, which builds on t5.py): a change to any of them remakes it."""
    seen = seen if seen is not None else set()
    seen.add(name)
    source = (HERE / f"{name}.py").read_bytes()
    for sibling in re.findall(rb"^\s*from (\w+) import", source, re.M):
        sibling = sibling.decode()
        if sibling not in seen and (HERE / f"{sibling}.py").exists():
            source += sources(sibling, seen)
    return source


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shared-data", type=Path, default=HERE.parent.parent.parent / "shared" / "data")
    parser.add_argument("--only", nargs="*", help="module names to (re)make; default: all")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    unavailable = args.out / "UNAVAILABLE"
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        unavailable.write_text(f"the Python references are not installed ({e}); run tools/setup --peers\n")
        print(f"make_fixtures: {unavailable.read_text().strip()}")
        return 0
    unavailable.unlink(missing_ok=True)
    sys.path.insert(0, str(HERE))
    versions = reference_versions()
    names = args.only or sorted(p.stem for p in HERE.glob("*.py") if p.stem != "make_fixtures")
    for name in names:
        source = sources(name)
        # Whether the real data is there changes what a module writes, so it is stamped too.
        inputs = versions + [f"shared data: {args.shared_data.is_dir()}"]
        stamp = hashlib.sha256(source + "\n".join(inputs).encode()).hexdigest()
        target = args.out / name
        stamp_file = target / "STAMP"
        if stamp_file.exists() and stamp_file.read_text() == stamp:
            print(f"make_fixtures: {name}: up to date")
            continue
        target.mkdir(parents=True, exist_ok=True)
        stamp_file.unlink(missing_ok=True)
        start = time.time()
        importlib.import_module(name).make(target, args.shared_data)
        stamp_file.write_text(stamp)  # last: a half-made fixture is remade next time
        print(f"make_fixtures: {name}: written in {time.time() - start:.1f} s ({', '.join(versions)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
