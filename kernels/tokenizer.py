"""CLIP tokenizers without a model hub.

The CLIP byte-pair vocabulary ships inside the ``open_clip_torch`` package as
``bpe_simple_vocab_16e6.txt.gz``. That file alone defines the SD1/SD2/SDXL
tokenizers: the vocabulary is the 256 byte symbols, the same with the
end-of-word mark ``</w>``, one entry per merge, then the two special tokens,
exactly as open_clip's ``SimpleTokenizer`` builds it. The file is read from the
package folder (found with :func:`importlib.util.find_spec`) without importing
open_clip, which would pull in torchvision.

A diffusers folder's own ``tokenizer/vocab.json`` + ``merges.txt`` win over the
built-in vocabulary (see :func:`tokenizer_from_files`).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdcache import errors

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

log = logging.getLogger(__name__)

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
#: Number of merges CLIP uses: 49152 tokens less the 512 byte symbols (with and without ``</w>``).
N_MERGES = 49152 - 256 - 2
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of GPT-2/CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def bpe_path() -> Path:
    """Where ``open_clip_torch`` keeps the CLIP BPE file (without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise errors.NotFound(
            "the CLIP vocabulary is missing: install open_clip_torch (pip install --no-deps open_clip_torch)"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / BPE_FILE
        if p.is_file():
            return p
    raise errors.NotFound(f"open_clip_torch is installed but has no {BPE_FILE}")


@functools.lru_cache(maxsize=1)
def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP vocabulary and merges (what ``vocab.json`` and ``merges.txt`` hold)."""
    lines = gzip.decompress(bpe_path().read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def write_vocab_files(folder: str | Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` derived from the BPE file into *folder*."""
    vocab, merges = clip_vocab()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


@functools.lru_cache(maxsize=8)
def clip_tokenizer(pad_token: str = EOS, model_max_length: int = 77) -> "CLIPTokenizer":
    """A CLIP tokenizer from the shipped BPE file (``pad_token`` is ``!`` for OpenCLIP encoders)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=model_max_length
    )


def tokenizer_from_files(vocab_json: str, merges_txt: str, config: dict[str, Any] | None) -> "CLIPTokenizer":
    """A CLIP tokenizer from a model folder's own ``vocab.json``/``merges.txt`` texts."""
    from transformers import CLIPTokenizer

    vocab = json.loads(vocab_json)
    merges = [tuple(line.split()) for line in merges_txt.split("\n") if line and not line.startswith("#version")]
    cfg = config or {}

    def tok(name: str, default: str) -> str:
        v = cfg.get(name, default)
        return v.get("content", default) if isinstance(v, dict) else (v or default)

    max_len = cfg.get("model_max_length", 77)
    if not isinstance(max_len, int) or max_len > 4096:
        max_len = 77
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=tok("unk_token", EOS),
        bos_token=tok("bos_token", BOS),
        eos_token=tok("eos_token", EOS),
        pad_token=tok("pad_token", EOS),
        model_max_length=max_len,
    )
