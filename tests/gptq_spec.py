"""GPTQ v1 from its published layout, in numpy, without qkern's code: the reader
(``spec_unpack``, ``spec_dequant``) and packer (``spec_pack``) the GPTQ interop tests check
qkern against, and ``hand_built`` checkpoints written with them.

The layout (AutoGPTQ's ``pack``, GPTQModel, vLLM's ``gptq_gemm``): qweight int32
(K * bits / 32, N), each output column's codes packed along the input dim, LSB first;
qzeros int32 (K / G, N * bits / 32), the zero point minus one, packed along the output dim;
scales float16 (K / G, N); g_idx int32 (K,), the group of each input.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import save_file


def spec_unpack(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Value j of a column/row sits at bit offset bits*j of its stream of 32-bit words."""
    w = np.moveaxis(words, axis, 0).astype(np.int64) & 0xFFFFFFFF
    n = w.shape[0] * 32 // bits
    out = np.zeros((n,) + w.shape[1:], np.int64)
    for j in range(n):
        q, r = divmod(bits * j, 32)
        v = w[q] >> r
        if r + bits > 32:
            v = v | (w[q + 1] << (32 - r))
        out[j] = v & ((1 << bits) - 1)
    return np.moveaxis(out, 0, axis)


def spec_pack(vals: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """AutoGPTQ's word layout, written out: 2/4/8 bits: 32/bits values per word, value i at
    bit bits*i; 3 bits: 32 values per 3 words (w0: values 0..9 at 3i and the low 2 bits of
    value 10 at 30; w1: bit 2 of value 10 at 0, values 11..20 at 3i+1, bit 0 of value 21 at 31;
    w2: bits 1..2 of value 21 at 0, values 22..31 at 3i+2)."""
    v = np.moveaxis(vals, axis, 0).astype(np.uint64)
    rest = v.shape[1:]
    if bits in (2, 4, 8):
        per = 32 // bits
        v = v.reshape((-1, per) + rest)
        words = sum(v[:, i] << np.uint64(bits * i) for i in range(per))
    else:
        v = v.reshape((-1, 32) + rest)

        def sh(x, s):
            return x << np.uint64(s)

        w0 = sum(sh(v[:, i], 3 * i) for i in range(10)) | sh(v[:, 10] & 3, 30)
        w1 = (v[:, 10] >> np.uint64(2)) | sum(sh(v[:, 11 + i], 3 * i + 1) for i in range(10)) \
            | sh(v[:, 21] & 1, 31)
        w2 = (v[:, 21] >> np.uint64(1)) | sum(sh(v[:, 22 + i], 3 * i + 2) for i in range(10))
        words = np.stack([w0, w1, w2], 1).reshape((-1,) + rest)
    words = (words & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)
    return np.ascontiguousarray(np.moveaxis(words, 0, axis))


def spec_dequant(t: dict, name: str, bits: int) -> np.ndarray:
    """W (N, K) float32 = (u - (stored zero + 1)) * scale[g_idx], each product rounded once."""
    u = spec_unpack(t[f"{name}.qweight"], bits, 0)            # (K, N)
    z = spec_unpack(t[f"{name}.qzeros"], bits, 1) + 1          # (groups, N)
    s = t[f"{name}.scales"].astype(np.float32)                 # (groups, N)
    g = t[f"{name}.g_idx"].astype(np.int64)
    return ((u - z[g]).astype(np.float32) * s[g]).T


def hand_built(model, folder, bits, group, sym, seed=0, v2=False, act_order=False):
    """A GPTQ folder for ``model`` with random codes / zeros / fp16 scales per linear of the
    blocks, packed by spec_pack. Returns the expected float32 weights (N, K) by layer."""
    rng = np.random.default_rng(seed)
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group,
                                  "sym": sym, "desc_act": act_order,
                                  "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    tensors, want = {}, {}
    for key, v in model.state_dict().items():
        tensors[key] = v.clone()
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or name == "lm_head":
            continue
        n, k = m.out_features, m.in_features
        groups = k // group
        u = rng.integers(0, 2 ** bits, (k, n))
        z = (np.full((groups, n), 2 ** (bits - 1)) if sym
             else rng.integers(1, 2 ** bits, (groups, n)))
        s = (rng.uniform(0.5, 2.0, (groups, n)) * 2.0 ** rng.integers(-9, -4, (groups, n)))
        s = s.astype(np.float16)
        g = np.arange(k) // group
        if act_order:
            g = g[rng.permutation(k)]
        del tensors[f"{name}.weight"]
        tensors[f"{name}.qweight"] = torch.from_numpy(spec_pack(u, bits, 0))
        stored = z if v2 else z - 1
        tensors[f"{name}.qzeros"] = torch.from_numpy(spec_pack(stored, bits, 1))
        tensors[f"{name}.scales"] = torch.from_numpy(s)
        tensors[f"{name}.g_idx"] = torch.from_numpy(g.astype(np.int32))
        want[name] = ((u - z[g]).astype(np.float32) * s[g].astype(np.float32)).T
    os.makedirs(folder)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg))
    return want
