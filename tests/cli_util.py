"""What the CLI tests (test_cli_*.py) share: running ``qkern`` in-process with its output
captured, a tiny transformers Llama folder with a tokenizer.json, the shipped byte-level model."""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path

from qkern.models.assets import WIKITEXT_BYTELM, WIKITEXT_TEXT, shipped_path
from qkern.tools.cli import main

BYTELM = shipped_path(WIKITEXT_BYTELM)
WIKI_TEST = shipped_path(WIKITEXT_TEXT.format(split="test"))
WIKI_VALID = shipped_path(WIKITEXT_TEXT.format(split="valid"))
WORDS = ("the quick brown fox jumps over a lazy dog while cats sleep on warm red mats and birds "
         "sing in tall green trees").split()


def run(*argv) -> tuple[int, str, str]:
    """``qkern *argv`` in this process: (exit status, stdout, stderr); argparse's SystemExit is
    turned into its status."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def sentences(n_words: int = 6000, seed: int = 0) -> str:
    r = random.Random(seed)
    return " ".join(r.choice(WORDS) for _ in range(n_words)) + "\n"


def tiny_llama_folder(root: Path) -> tuple[Path, Path]:
    """A tiny random LlamaForCausalLM (vocab 96, context 128) saved with save_pretrained plus
    a word-level tokenizer.json of < 96 tokens; returns (folder, a calibration text file)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    import llm_models as LM

    folder = root / "tiny-llama"
    LM.build("llama").save_pretrained(folder)
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(sorted(set(WORDS)))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    text = root / "calib.txt"
    text.write_text(sentences())
    return folder, text
