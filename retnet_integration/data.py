"""Real text from an installed package: Debian's `fortunes` (apt-get install fortunes).

Byte-level tokens (vocabulary 256). The corpus is every top-level fortune file in name order,
split at the `%` lines into fortunes; fortune i goes to test if i % 20 == 0, to validation if
i % 20 == 1, else to train: deterministic, interleaved across files so every split sees every
topic. A fortune whose normalised text (lower case, runs of whitespace as one space) came
earlier is dropped (121 of 15,218: the same quote in two files), so no text sits in two splits.
Each split is one byte stream of its fortunes joined by "\\n%\\n".
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from gqa_lut.errors import UsageError

FORTUNES_DIR = Path(os.environ.get("GQA_FORTUNES_DIR", "/usr/share/games/fortunes"))
SEPARATOR = b"\n%\n"
SPLIT_RULE = ("fortune i: test if i % 20 == 0, validation if i % 20 == 1, else train; "
              "a repeat of an earlier fortune's normalised text is dropped")


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    info: dict


def read_fortunes(directory: Path = FORTUNES_DIR) -> list[bytes]:
    if not directory.is_dir():
        raise UsageError(f"fortunes not found at {directory}: install them with "
                         "`apt-get install fortunes` (or set GQA_FORTUNES_DIR)")
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))
    out = []
    for p in files:
        text = p.read_bytes().replace(b"\r\n", b"\n")
        out += [f.strip(b"\n") for f in text.split(b"\n%\n") if f.strip()]
    if not out:
        raise UsageError(f"no fortunes in {directory}")
    return out


def normalised(fortune: bytes) -> bytes:
    return b" ".join(fortune.lower().split())


def load_corpus(directory: Path = FORTUNES_DIR) -> Corpus:
    fortunes = read_fortunes(directory)
    parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
    seen: set[bytes] = set()
    dropped = 0
    for i, f in enumerate(fortunes):
        key = normalised(f)
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        parts["test" if i % 20 == 0 else "val" if i % 20 == 1 else "train"].append(f)
    streams = {k: torch.frombuffer(bytearray(SEPARATOR.join(v)), dtype=torch.uint8).long() for k, v in parts.items()}
    digest = hashlib.sha256(b"".join(fortunes)).hexdigest()[:16]
    info = {"source": str(directory), "fortunes": len(fortunes), "duplicates_dropped": dropped,
            "split_rule": SPLIT_RULE, "sha256_16": digest,
            **{f"{k}_fortunes": len(v) for k, v in parts.items()},
            **{f"{k}_bytes": int(s.numel()) for k, s in streams.items()}}
    return Corpus(streams["train"], streams["val"], streams["test"], info)


def random_windows(stream: torch.Tensor, length: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, length + 1) random windows: inputs and their next-byte targets."""
    starts = torch.randint(0, stream.numel() - length - 1, (batch,), generator=generator)
    return torch.stack([stream[s:s + length + 1] for s in starts.tolist()])


def eval_windows(stream: torch.Tensor, length: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping (n, length + 1) windows covering the stream in order (the last partial one dropped)."""
    n = (stream.numel() - 1) // length
    if limit is not None:
        n = min(n, limit)
    idx = torch.arange(n)[:, None] * length + torch.arange(length + 1)[None, :]
    return stream[idx]
