"""The differential test of deltatune's safetensors reader against Python's safetensors: for
each file, both accept it with the same tensors (name, dtype, shape, bytes) or both reject it.

    python tools/safetensors_differential.py --dump build/fuzz/safetensors_dump FOLDER...

FOLDER holds the files (ctest passes the safetensors seed corpus of tools/make_fuzz_corpus.py:
valid files and malformed variants). safetensors_dump (fuzz/safetensors_dump.cpp) prints the C++
side; this prints the same for Python, then lists every file on which they disagree and exits 1
if there is one.
"""
import argparse
import subprocess
import sys
from pathlib import Path

# FNV-1a, 64 bits: safetensors_dump.cpp's digest of a tensor's bytes.
def fnv1a(data):
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def python_view(path):
    """What Python's safetensors makes of the file, in safetensors_dump's format."""
    import torch
    from safetensors import safe_open

    try:
        lines = []
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(f.keys()):
                dtype = f.get_slice(name).get_dtype()
                t = f.get_tensor(name)
                data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                shape = ", ".join(str(d) for d in t.shape)
                lines.append(f"  {name} {dtype} [{shape}] {fnv1a(data):016x}")
        return [f"accept {path.name}"] + lines
    except Exception as e:  # SafetensorError, and whatever else it raises on a bad file: a refusal
        return [f"reject {path.name}  # {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]


def split_by_file(lines):
    """{file name: its lines}, from the dump's lines (each file's first line names it)."""
    files, current = {}, None
    for line in lines:
        if not line.startswith("  "):
            current = line.split()[1].rstrip(":")
            files[current] = []
        files[current].append(line)
    return files


def verdict(lines):
    """The comparable part: the first word and the tensor lines, without Python's reasons."""
    return [lines[0].split()[0]] + lines[1:]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dump", required=True, help="the safetensors_dump program")
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args()
    paths = sorted(p for folder in args.folders for p in folder.iterdir() if p.is_file())
    if not paths:
        print("safetensors_differential: no files in", *args.folders)
        return 1
    ours = split_by_file(subprocess.run([args.dump, *map(str, paths)], check=True, capture_output=True,
                                        text=True).stdout.splitlines())
    disagree = 0
    for path in paths:
        theirs = python_view(path)
        mine = ours.get(path.name, [f"missing {path.name}"])
        if verdict(mine) != verdict(theirs):
            disagree += 1
            print(f"DISAGREE {path.name}\n  deltatune: " + "\n  deltatune: ".join(mine) +
                  "\n  python:    " + "\n  python:    ".join(theirs))
    print(f"safetensors_differential: {len(paths) - disagree} of {len(paths)} files agree")
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(main())
