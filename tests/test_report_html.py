"""``qkern report``: the HTML it writes parses, its images are valid PNGs, its numbers match an
independent computation; --help and the exit codes of bad command lines."""

from __future__ import annotations

import base64
import io
import struct
import sys
import zlib
from html.parser import HTMLParser

import pytest
import torch

from qkern.models import bits_per_byte, load_llama
from qkern.models.assets import shipped_path
from qkern.nn import QuantLinear
from qkern.quantization import RTNConfig, text_calibration
from qkern.tools import cli
from qkern.tools.reports import llm
from qkern.tools.reports.llm import quantize

N_CAL, N_EVAL = 1, 2


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.rows, self._row, self._cell, self._in_table = [], [], None, None, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        elif tag == "table" and a.get("id") == "numbers":
            self._in_table = True
        elif self._in_table and tag == "tr":
            self._row = []
        elif self._in_table and tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_table = False
        elif self._in_table and tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif self._in_table and tag == "tr":
            self.rows.append(self._row)

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _png_size(data: bytes) -> tuple[int, int]:
    """Checks the PNG signature and every chunk's CRC; returns IHDR's (width, height)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body, crc = data[pos + 8:pos + 8 + n], data[pos + 8 + n:pos + 12 + n]
        assert struct.unpack(">I", crc)[0] == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + n
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    assert any(k == b"IDAT" for k, _ in chunks)
    return struct.unpack(">II", chunks[0][1][:8])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("rep") / "r.html"
    made = []

    def keep(model, cfg, cal):  # records the quantized models the report measures
        made.append((quantize(model, cfg, cal)[0], cfg, cal))
        return made[-1][0], 1.0

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llm, "quantize", keep)
        rc = cli.main(["report", "--quick", "--methods", "rtn", "--settings", "w4 g128",
                       "--samples", str(N_CAL), "--eval-windows", str(N_EVAL), "--out",
                       str(out)])
    assert rc == 0 and len(made) == 1
    page = _Page()
    page.feed(out.read_text())
    return out, page, made[0]


def test_images_are_valid_pngs(report):
    out, page, _ = report
    assert len(page.imgs) == 4
    mpimg = pytest.importorskip("matplotlib.image")
    for img in page.imgs:
        head, b64 = img["src"].split(",", 1)
        assert head == "data:image/png;base64" and img.get("alt")
        data = base64.b64decode(b64, validate=True)
        w, h = _png_size(data)
        assert 300 <= w <= 3000 and 200 <= h <= 3000
        arr = mpimg.imread(io.BytesIO(data), format="png")
        assert arr.shape[:2] == (h, w)
        assert float(arr[..., :3].std()) > 0.01  # not a blank canvas


def test_markdown_and_png_files(report):
    out, page, _ = report
    md = out.with_suffix(".md").read_text()
    files = out.parent / "r_files"
    embedded = sorted(base64.b64decode(i["src"].split(",", 1)[1]) for i in page.imgs)
    on_disk = sorted(p.read_bytes() for p in files.glob("*.png"))
    assert embedded == on_disk
    for p in files.glob("*.png"):
        assert f"](r_files/{p.name})" in md
    assert "| RTN | w4 g128 |" in md
    assert not list(out.parent.glob(".*qkern-tmp"))  # atomic writes leave no temporaries


def test_numbers_match_an_independent_computation(report):
    _, page, _ = report
    head, *rows = page.rows
    table = {(r[0], r[1]): dict(zip(head, r)) for r in rows}
    model = load_llama(shipped_path("models/wikitext-bytelm"))
    valid = shipped_path("data/wikitext-2/wiki.valid.tokens").read_bytes()
    test = shipped_path("data/wikitext-2/wiki.test.tokens").read_bytes()
    with torch.no_grad():
        fp = bits_per_byte(model, test, n_windows=N_EVAL)
    assert float(table[("fp32", "-")]["bits/byte"]) == pytest.approx(fp, abs=6e-5)
    cal = text_calibration(valid, "bytes", N_CAL, 256)
    q, cfg, used = report[2]  # the model the report measured, measured again here
    assert cfg == RTNConfig(bits=4, group_size=128, sym=False)
    assert len(used) == N_CAL and all(torch.equal(a, b) for a, b in zip(used, cal))
    row = table[("RTN", "w4 g128")]
    assert float(row["seconds"]) == 1.0
    with torch.no_grad():
        bpb = bits_per_byte(q, test, n_windows=N_EVAL)
    assert float(row["bits/byte"]) == pytest.approx(bpb, abs=6e-5)
    assert float(row["Δ vs fp32"]) == pytest.approx(bpb - fp, abs=1.2e-4)
    # bits per weight from the layer shapes: 4-bit codes + one scale and zero point per group
    # (a group is 128 inputs, or the whole row where 128 does not divide the row)
    bits = n = 0
    for mod in q.modules():
        if isinstance(mod, QuantLinear):
            qt = mod.quantized_weight()
            g = 128 if mod.in_features % 128 == 0 else mod.in_features
            zbits = 32 if qt.zero_point.is_floating_point() else 4
            k = mod.in_features * mod.out_features
            bits += 4 * k + (k // g) * (32 + zbits)
            n += k
    assert n == 4 * (4 * 256 * 256 + 3 * 256 * 672)
    assert float(row["bits/weight"]) == pytest.approx(bits / n, abs=6e-4)
    errs = [r.error for r in q.qkern_report]
    assert float(row["max layer error"]) == pytest.approx(max(errs), rel=2e-3)


def test_help(capsys):
    assert cli.main(["report", "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: qkern report")
    for opt in ("--model", "--methods", "--settings", "--out", "--quick", "Exit status"):
        assert opt in text
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0 and "report" in capsys.readouterr().out


@pytest.mark.parametrize("args, what", [
    (["--methods", "rtn,bogus"], "unknown method 'bogus'"),
    (["--settings", "w4 g0"], "bad setting"),
    (["--settings", "w9 g128"], "bad setting"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--model", "/nonexistent/model-dir"], "model folder /nonexistent/model-dir not found"),
    (["--out", "/nonexistent/dir/r.html"], "does not exist"),
    (["--out", "report.txt"], "give an .html file name"),
    (["--bogus-option"], "unrecognized arguments"),
])
def test_usage_errors_exit_2(args, what, capsys, tmp_path):
    assert cli.main(["report", "--quick", *args]) == 2
    err = capsys.readouterr().err
    assert what in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_missing_matplotlib_exits_1(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "r.html"
    assert cli.main(["report", "--quick", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "pip install matplotlib" in err and len(err.splitlines()) == 1
    assert not out.exists()
