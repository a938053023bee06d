# Writes the golden safetensors file for tests/core/safetensors_test.cpp with the Python
# `safetensors` library and prints its bytes as the C++ array the test embeds.
import os
import tempfile

import torch
from safetensors.torch import save_file

tensors = {
    "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "b": torch.tensor([1, 2], dtype=torch.int64),
}
path = os.path.join(tempfile.mkdtemp(), "golden.safetensors")
save_file(tensors, path, metadata={"format": "pt"})
data = open(path, "rb").read()

print(f"// {len(data)} bytes, from tools/make_safetensors_golden.py")
print("const unsigned char kGolden[] = {")
for i in range(0, len(data), 12):
    print("    " + ", ".join(f"0x{b:02x}" for b in data[i:i + 12]) + ",")
print("};")
