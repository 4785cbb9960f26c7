"""``qkern eval``: bits per byte, perplexity and KL against independent computations, --help,
and the exit status of each error."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import qkern  # noqa: E402
from cli_util import BYTELM, WIKI_TEST, run, tiny_llama_folder  # noqa: E402
from qkern.models import bits_per_byte, load_llama, load_pretrained  # noqa: E402
from qkern.tools import cli  # noqa: E402

W = 8  # windows of 256 bytes


@pytest.fixture(scope="module")
def rtn_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "rtn3"
    q = qkern.quantize_model(load_pretrained(BYTELM), qkern.RTNConfig(bits=3, group_size=32),
                             progress=False)
    qkern.export(q, out, format="qkern")
    return out


def _json(*argv) -> dict:
    rc, out, err = run("eval", *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def test_float_bits_per_byte_is_the_models_own():
    got = _json(BYTELM, "--windows", W)
    want = bits_per_byte(load_llama(BYTELM), WIKI_TEST.read_bytes(), 256, W)
    assert got["bits_per_byte"] == pytest.approx(want, abs=1e-4)
    assert (got["windows"], got["seqlen"], got["tokens"]) == (W, 256, W * 255)


def test_kl_to_itself_is_zero_and_to_float_matches_kl_div(rtn_folder):
    same = _json(BYTELM, "--windows", 2, "--reference", BYTELM)
    assert abs(same["kl"]) < 1e-6
    assert same["reference_bits_per_byte"] == pytest.approx(same["bits_per_byte"], abs=1e-9)
    got = _json(rtn_folder, "--windows", 4, "--reference", BYTELM, "--batch", 3)
    # independent: torch's kl_div on the same windows, each model loaded here
    x = torch.frombuffer(bytearray(WIKI_TEST.read_bytes()[:4 * 256]),
                         dtype=torch.uint8).long().view(4, 256)
    with torch.no_grad():
        lq = F.log_softmax(qkern.from_pretrained(rtn_folder)(x).logits[:, :-1], -1)
        lp = F.log_softmax(load_pretrained(BYTELM)(x).logits[:, :-1], -1)
    kl = F.kl_div(lq.reshape(-1, 256), lp.reshape(-1, 256), log_target=True,
                  reduction="batchmean")
    assert got["kl"] == pytest.approx(float(kl), rel=1e-4)
    assert got["kl"] > 1e-4  # 3 bits moves the distribution
    nll = -lq.gather(-1, x[:, 1:, None]).mean() / math.log(2)
    assert got["bits_per_byte"] == pytest.approx(float(nll), abs=1e-5)
    assert got["format"] == "qkern"


def test_text_output_prints_bits_per_byte_and_kl(rtn_folder):
    rc, out, err = run("eval", rtn_folder, "--windows", 2, "--reference", BYTELM)
    assert rc == 0, err
    assert "bits/byte" in out and "KL " in out and "nats/token" in out


def test_perplexity_of_a_tokenized_model(tmp_path):
    folder, text = tiny_llama_folder(tmp_path)
    got = _json(folder, "--data", text, "--seqlen", 32, "--windows", 4)
    # independent: the tokenizers package and transformers' own loss
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text.read_text()).ids
    x = torch.tensor(ids[:4 * 32]).view(4, 32)
    with torch.no_grad():
        loss = load_pretrained(folder)(x, labels=x).loss
    assert got["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert "bits_per_byte" not in got and got["tokenizer"] == "tokenizer.json"
    rc, out, _ = run("eval", folder, "--data", text, "--seqlen", 32, "--windows", 4)
    assert rc == 0 and "perplexity" in out


def test_help_lists_every_option_with_text():
    rc, out, _ = run("eval", "--help")
    assert rc == 0
    sub = next(a for a in cli._build_parser()._actions if a.dest == "command")
    for action in sub.choices["eval"]._actions:
        assert action.help, action.dest
        for opt in action.option_strings:
            assert opt in out
    assert "default: 48" in out and "wiki.test.tokens" in out


def test_usage_errors_exit_2(tmp_path, rtn_folder):
    folder, text = tiny_llama_folder(tmp_path)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    qk = tmp_path / "m.qk"
    m = torch.nn.Sequential(torch.nn.Linear(64, 32))
    qkern.save(qkern.quantize_model(m, qkern.WeightOnlyConfig(group_size=32)), qk)
    cases = [
        ([tmp_path / "nope"], "no such file or folder"),
        ([BYTELM, "--data", tmp_path / "nope.txt"], "no such file"),
        ([BYTELM, "--seqlen", 512], "context length"),
        ([BYTELM, "--data", short], "one window needs"),
        ([BYTELM, "--windows", 0], "positive"),
        ([qk], "qkern.load"),
        ([folder, "--data", text, "--tokenizer", "bytes", "--seqlen", 32], "does not belong"),
        ([folder, "--data", text, "--tokenizer", tmp_path], "no tokenizer.json"),
        ([rtn_folder, "--reference", folder, "--windows", 1], "same tokens"),
        ([tmp_path], "no config.json"),
    ]
    for argv, message in cases:
        rc, _, err = run("eval", *argv)
        assert rc == 2, (argv, err)
        assert message in err and "Traceback" not in err, (argv, err)
    (folder / "tokenizer.json").unlink()
    rc, _, err = run("eval", folder, "--data", text)
    assert rc == 2 and "--tokenizer" in err


def test_broken_checkpoint_exit_1(tmp_path, rtn_folder):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((rtn_folder / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"\0" * 16)
    rc, _, err = run("eval", bad)
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("qkern eval: error: ")
