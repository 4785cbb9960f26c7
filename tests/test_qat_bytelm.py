"""The wikitext-bytelm (a transformers LlamaForCausalLM) at W4A8 with the attention matmuls
quantized: a short LSQ fine-tune on WikiText-2 valid recovers at least half of RTN's
bits-per-byte gap to fp32 on WikiText-2 test (docs/qat.md has the 48-window, 200-step
figures). Bits per byte are computed here from the logits, independently of the report."""

import math

import torch
import torch.nn.functional as F

from qkern.models import load_pretrained
from qkern.models.assets import WIKITEXT_BYTELM, WIKITEXT_TEXT, shipped_path
from qkern.tools.reports import qat_transformers as R


def bpb(model, ids):
    with torch.no_grad():
        logits = model(ids).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    return float(nll) / math.log(2)


def test_short_qat_recovers_half_of_the_rtn_gap():
    torch.manual_seed(0)
    model = load_pretrained(shipped_path(WIKITEXT_BYTELM))
    test = shipped_path(WIKITEXT_TEXT.format(split="test")).read_bytes()[: 16 * 256]
    ids = torch.frombuffer(bytearray(test), dtype=torch.uint8).long().view(16, 256)
    calib = R.windows(R.text_bytes("valid"), 8, 256, torch.Generator().manual_seed(0))
    fp32 = bpb(model, ids)
    rtn = bpb(R.calibrated(model, "ste", calib), ids)
    qat = bpb(R.finetune_bytelm(model, steps=30), ids)
    assert rtn > fp32 + 0.003, (fp32, rtn)  # the gap exists
    assert rtn - qat >= 0.5 * (rtn - fp32), (fp32, rtn, qat)
