"""The corpus: this Python's standard-library sources as bytes, a fixed held-out split by file, byte codec.

Legend: n tokens (bytes), B batch, S sequence length, V vocabulary (256 bytes + specials).
The files are read at run time from sysconfig.get_paths()["stdlib"]; nothing is copied into the repo.
File list: every *.py below the stdlib root, sorted by relative path, except site-packages, test
suites and the machine-specific _sysconfigdata module. Held-out files: crc32(relative path) % 20 == 0.
"""

from __future__ import annotations

import functools
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["BOS", "EOS", "PAD", "NUM_BYTES", "VOCAB_SIZE", "Corpus", "corpus_files", "decode", "encode",
           "heldout_ids", "heldout_windows", "load_corpus"]

NUM_BYTES = 256
BOS, EOS, PAD = 256, 257, 258  # specials after the 256 byte values
VOCAB_SIZE = 264  # 256 bytes + 3 specials, padded to a multiple of 8
HELDOUT_MODULUS = 20  # one file in twenty (by path hash) is held out
_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of `text` as ids -> LongTensor [n]; lone surrogates pass through, so any str round-trips."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    data = text.encode("utf-8", errors="surrogatepass")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() if data else torch.empty(0, dtype=torch.long)


def decode(ids) -> str:
    """ids (LongTensor [n] or [1, n], or a list of ints) -> str; specials are skipped.

    Exact inverse of encode. Byte sequences that are not valid UTF-8 (a model can emit them) decode with
    U+FFFD replacement characters.
    """
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"ids must be 1-D (or [1, n]), got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    if not all(isinstance(i, int) and 0 <= i < VOCAB_SIZE for i in ids):
        raise ValueError(f"ids must be ints in [0, {VOCAB_SIZE})")
    data = bytes(i for i in ids if i < NUM_BYTES)
    try:
        return data.decode("utf-8", errors="surrogatepass")
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace")


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def _keep(rel: Path) -> bool:
    return not (_SKIP_PARTS & set(rel.parts[:-1])) and not rel.name.startswith("_sysconfigdata")


def corpus_files(root: Path | None = None) -> list[str]:
    """Relative paths (posix, sorted) of the corpus files below `root` (default: this Python's stdlib)."""
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise ValueError(f"root must be a directory, got {root}")
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py") if _keep(p.relative_to(root)))


def is_heldout(rel: str) -> bool:
    """Is this relative path in the held-out split (fixed by a hash of the path)?"""
    return zlib.crc32(rel.encode()) % HELDOUT_MODULUS == 0


@dataclass
class Corpus:
    """Train and held-out streams: uint8 [n] each, files joined by one newline byte, plus provenance."""

    train: torch.Tensor  # [n_train] uint8
    heldout: torch.Tensor  # [n_heldout] uint8
    train_files: int
    heldout_files: int
    python: str

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """Random windows of the split -> LongTensor [B, S + 1] (inputs are [:, :-1], labels [:, 1:])."""
        data = {"train": self.train, "heldout": self.heldout}.get(split)
        if data is None:
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)  # [B]
        idx = starts[:, None] + torch.arange(seq_len + 1)  # [B, S + 1]
        return data[idx].long()


def _join(root: Path, files: list[str]) -> torch.Tensor:
    blob = b"\n".join(root.joinpath(f).read_bytes() for f in files)
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


@functools.lru_cache(maxsize=2)
def load_corpus(root: str | None = None) -> Corpus:
    """Read the corpus (cached): train and held-out byte streams of the stdlib sources."""
    base = stdlib_root() if root is None else Path(root)
    files = corpus_files(base)
    held = [f for f in files if is_heldout(f)]
    train = [f for f in files if not is_heldout(f)]
    if not held or not train:
        raise ValueError(f"root {base} has too few .py files for a train/held-out split ({len(files)} found)")
    return Corpus(_join(base, train), _join(base, held), len(train), len(held), sys.version.split()[0])


def heldout_windows(num_windows: int, length: int) -> torch.Tensor:
    """num_windows windows of `length` bytes at evenly spaced fixed positions of the held-out stream -> [n, length]."""
    for name, v in (("num_windows", num_windows), ("length", length)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    held = load_corpus().heldout
    if length >= held.numel():
        raise ValueError(f"length must be < {held.numel()} (the held-out stream), got {length}")
    starts = torch.linspace(0, held.numel() - length - 1, num_windows).long()  # [n]
    return held[starts[:, None] + torch.arange(length)].long()  # [n, length]


def heldout_ids(num_tokens: int) -> torch.Tensor:
    """The first `num_tokens` bytes of the held-out stream -> LongTensor [1, num_tokens]."""
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    held = load_corpus().heldout
    if num_tokens > held.numel():
        raise ValueError(f"num_tokens must be <= {held.numel()} (the held-out stream), got {num_tokens}")
    return held[:num_tokens].long()[None]  # [1, n]
