"""AWQ: qkern's AWQConfig beside mit-han-lab/llm-awq's own search on the same model and data.

wikitext-bytelm, calibration 64 x 256 bytes of WikiText-2 valid, bits per byte on WikiText-2
test (48 windows of 256 bytes), at w4 g128 and w3 g128 (zero points, as llm-awq), with the
time of each search. Rows:

- fp32; RTN (qkern, zero points); RTN (llm-awq's pseudo_quantize_tensor);
- AWQ (qkern): ``qkern.quantize_model(model, AWQConfig(bits, 128), calibration)``;
- AWQ (llm-awq): their ``run_awq`` (auto_scale + auto_clip) on
  ``transformers.LlamaForCausalLM.from_pretrained(models/wikitext-bytelm)``, then, as their
  entry.py does, ``apply_awq`` on a fresh model and their ``pseudo_quantize_model_weight``;
- llm-awq search + qkern RTN: their scales / clips, quantized on qkern's grid.

llm-awq is read at run time from the fetched mirror (``QKERN_AWQ_MIRROR``, default
/work/.mirror/mit-han-lab+llm-awq/repo: its awq/quantize and awq/utils are extracted to a
temporary folder; nothing of it is in qkern). Its search is pure torch but written for CUDA
and transformers 4.46; these compatibility shims (no algorithm code) let it run on the CPU
with transformers 5:

- ``awq_inference_engine`` (their CUDA kernels, used only by real quantization) and
  ``datasets`` (the pile-val download) are empty stub modules; ``get_calib_dataset`` returns
  the same 64 x 256 calibration qkern gets;
- ``Module.cuda`` / ``Tensor.cuda`` and ``move_embed`` are no-ops; ``Tensor.cpu`` copies a
  tensor already on the CPU (their scale search snapshots the block with ``.cpu()`` and
  restores it after each alpha: on a GPU that is a copy, on the CPU an alias);
- ``LlamaDecoderLayer.forward`` returns a tuple, as in transformers 4.x (run_awq indexes
  ``[0]``);
- pseudo_quantize_tensor quantizes per output channel where the group size does not divide
  the layer's input (down_proj: 672 % 128 != 0; their code asserts; qkern falls back to per
  channel for the same layer), and auto_clip_layer gets its rows padded to a multiple of 64
  (its ``oc_batch_size`` assert; 672 rows; rows are independent there, the padding is dropped).

Run: PYTHONPATH=python python bench/awq_reference.py [--bits 4 3] [--samples 64]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import types

import torch
from torch import nn

import qkern
from qkern.models import bits_per_byte, load_llama
from qkern.models.assets import shipped_path
from qkern.quantization import text_calibration

MODEL = shipped_path("models/wikitext-bytelm")
VALID = shipped_path("data/wikitext-2/wiki.valid.tokens")
TEST = shipped_path("data/wikitext-2/wiki.test.tokens")
MIRROR = os.environ.get("QKERN_AWQ_MIRROR", "/work/.mirror/mit-han-lab+llm-awq/repo")


def load_reference(tmp: str):
    """llm-awq's modules (namespace), or the reason they cannot be loaded (str)."""
    if not os.path.isdir(MIRROR):
        return f"llm-awq mirror not found at {MIRROR} (set QKERN_AWQ_MIRROR)"
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed (pip install qkern[hf])"
    tar = subprocess.run(["git", "--git-dir", MIRROR, "archive", "HEAD", "awq/quantize",
                          "awq/utils"], capture_output=True, check=False)
    if tar.returncode:
        return f"git archive failed: {tar.stderr.decode()[-300:]}"
    subprocess.run(["tar", "-x", "-C", tmp], input=tar.stdout, check=True)
    for name in ("awq_inference_engine", "datasets"):
        if importlib.util.find_spec(name) is None:
            stub = types.ModuleType(name)
            stub.load_dataset = None  # type: ignore[attr-defined]
            sys.modules[name] = stub
    sys.path.insert(0, tmp)
    with contextlib.redirect_stdout(sys.stderr):  # their "VILA is not installed" notice
        import awq.quantize.auto_clip as auto_clip
        import awq.quantize.pre_quant as pre_quant
        import awq.quantize.quantizer as quantizer
        import awq.utils.calib_data as calib_data
    return types.SimpleNamespace(auto_clip=auto_clip, pre_quant=pre_quant,
                                 quantizer=quantizer, calib_data=calib_data)


@contextlib.contextmanager
def shims(ref, samples):
    """The compatibility shims of the module docstring, undone on exit."""
    from transformers.models.llama import modeling_llama as ML

    saved = [(nn.Module, "cuda"), (nn.Module, "cpu"), (torch.Tensor, "cuda"),
             (torch.Tensor, "cpu"), (ref.pre_quant, "move_embed"),
             (ref.calib_data, "get_calib_dataset"), (ML.LlamaDecoderLayer, "forward"),
             (ref.quantizer, "pseudo_quantize_tensor"),
             (ref.auto_clip, "pseudo_quantize_tensor"), (ref.auto_clip, "auto_clip_layer")]
    old = [(o, n, getattr(o, n)) for o, n in saved]
    tensor_cpu = torch.Tensor.cpu
    layer_fwd = ML.LlamaDecoderLayer.forward
    pq = ref.quantizer.pseudo_quantize_tensor
    clip_layer = ref.auto_clip.auto_clip_layer

    def cpu_copy(t, *a, **k):
        return t.clone() if t.device.type == "cpu" else tensor_cpu(t, *a, **k)

    def layer_tuple(self, *a, **k):
        out = layer_fwd(self, *a, **k)
        return out if isinstance(out, tuple) else (out,)

    def pseudo(w, n_bit=8, zero_point=True, q_group_size=-1, **kw):
        k = w.shape[-1]
        if q_group_size <= 0 or k % q_group_size:
            q_group_size = k  # per output channel
        return pq(w, n_bit=n_bit, zero_point=zero_point, q_group_size=q_group_size, **kw)

    def clip(w, input_feat, n_bit, q_config, **kw):
        g = q_config["q_group_size"]
        if g > 0 and w.shape[1] % g:
            q_config = {**q_config, "q_group_size": -1}
        n = w.shape[0]
        pad = (-n) % 64
        if pad:
            w = torch.cat([w, w[-1:].expand(pad, -1)])
        return clip_layer(w, input_feat, n_bit, q_config, **kw)[:n]

    nn.Module.cuda = lambda self, *a, **k: self
    nn.Module.cpu = lambda self, *a, **k: self
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.cpu = cpu_copy
    ref.pre_quant.move_embed = lambda model, device: None
    ref.calib_data.get_calib_dataset = lambda **kw: [s.clone() for s in samples]
    ML.LlamaDecoderLayer.forward = layer_tuple
    ref.quantizer.pseudo_quantize_tensor = pseudo
    ref.auto_clip.pseudo_quantize_tensor = pseudo
    ref.auto_clip.auto_clip_layer = clip
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for o, n, v in old:
            setattr(o, n, v)


def hf_model():
    import transformers
    m = transformers.LlamaForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    m.config.use_cache = False
    return m.eval()


def to_qkern(hf) -> nn.Module:
    """qkern's Llama holding the transformers model's weights (same names)."""
    m = load_llama(MODEL)
    sd = hf.state_dict()
    m.load_state_dict({k: sd[k] for k in m.state_dict()}, strict=True)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--objective", nargs="*", default=["module"], choices=["module", "block"],
                    help="qkern AWQ objectives to run (none: skip qkern AWQ)")
    args = ap.parse_args()
    torch.manual_seed(0)
    cal = text_calibration(VALID, "bytes", args.samples, args.seqlen)
    test = open(TEST, "rb").read()
    model = load_llama(MODEL)

    def bpb(m) -> float:
        with torch.no_grad():
            return bits_per_byte(m, test)

    def row(name: str, value: float, secs: float | None = None) -> None:
        t = "" if secs is None else f"{secs:8.1f} s"
        print(f"| {name:<34} | {value:.4f} | {t:>10} |", file=sys.__stdout__, flush=True)

    print(f"wikitext-bytelm, bits per byte on WikiText-2 test (48 x 256), calibration "
          f"{args.samples} x {args.seqlen} bytes of WikiText-2 valid; threads "
          f"{torch.get_num_threads()}")
    print("| method | bits/byte | search time |\n|---|---|---|")
    row("fp32", bpb(model))
    with tempfile.TemporaryDirectory() as tmp:
        ref = load_reference(tmp)
        if isinstance(ref, str):
            print(f"llm-awq columns skipped: {ref}", file=sys.stderr)
        for bits in args.bits:
            tag = f"w{bits} g{args.group}"
            rtn = qkern.quantize_model(model, qkern.RTNConfig(bits=bits, group_size=args.group,
                                                              sym=False))
            row(f"{tag} RTN (qkern)", bpb(rtn))
            for obj in args.objective:
                t = time.perf_counter()
                q = qkern.quantize_model(model, qkern.AWQConfig(
                    bits=bits, group_size=args.group, objective=obj), cal)
                row(f"{tag} AWQ (qkern, {obj})", bpb(q), time.perf_counter() - t)
            if isinstance(ref, str):
                continue
            q_config = {"zero_point": True, "q_group_size": args.group}
            with shims(ref, cal):
                hf = hf_model()
                ref.quantizer.pseudo_quantize_model_weight(hf, w_bit=bits, q_config=q_config)
                row(f"{tag} RTN (llm-awq)", bpb(to_qkern(hf)))
                t = time.perf_counter()
                results = ref.pre_quant.run_awq(hf_model(), None, w_bit=bits, q_config=q_config,
                                                n_samples=args.samples, seqlen=args.seqlen)
                secs = time.perf_counter() - t
                hf = hf_model()
                ref.pre_quant.apply_awq(hf, results)
                scaled = to_qkern(hf)
                ref.quantizer.pseudo_quantize_model_weight(hf, w_bit=bits, q_config=q_config)
                row(f"{tag} AWQ (llm-awq)", bpb(to_qkern(hf)), secs)
            q = qkern.quantize_model(scaled, qkern.RTNConfig(bits=bits, group_size=args.group,
                                                             sym=False))
            row(f"{tag} llm-awq search + qkern RTN", bpb(q))


if __name__ == "__main__":
    main()
