"""Real text from installed packages, byte-level (vocabulary 256), split into documents.

Two corpora, each a list of documents in a fixed order:
- `fortunes`: Debian's `fortunes` (apt-get install fortunes), 2.6 MB: every top-level fortune
  file in name order, split at the `%` lines;
- `gcide`: Debian's `dict-gcide` (apt-get install dict-gcide), 40 MB: the Collaborative
  International Dictionary of English, one document per dictionary entry in file order (the
  gpu presets' corpus: 15x the text, so their conclusions do not rest on 2.3 MB).

Document i goes to test if i % 20 == 0, to validation if i % 20 == 1, else to train:
deterministic, interleaved so every split sees every source file and every letter. A document
whose normalised text (lower case, runs of whitespace as one space) came earlier is dropped
(fortunes: 121 of 15,218, the same quote in two files). An evaluation document (test or
validation) is dropped too when half or more of its 8-word shingles occur in a train document
or an earlier evaluation document: near-duplicates (a quote with another attribution, a
reworded joke) would otherwise score memorised text. The train split is left as it was, so
models trained before the rule existed saw the same bytes. Each split is one byte stream of its
documents joined by "\\n%\\n".
"""
from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from gqa_lut.errors import UsageError

FORTUNES_DIR = Path(os.environ.get("GQA_FORTUNES_DIR", "/usr/share/games/fortunes"))
GCIDE_DIR = Path(os.environ.get("GQA_GCIDE_DIR", "/usr/share/dictd"))
SEPARATOR = b"\n%\n"
SHINGLE = 8  # words per shingle
NEAR = 0.5  # share of an evaluation document's shingles seen before that makes it a near-duplicate
SPLIT_RULE = ("document i: test if i % 20 == 0, validation if i % 20 == 1, else train; "
              "a repeat of an earlier document's normalised text is dropped; a test or validation "
              f"document with >= {NEAR:g} of its {SHINGLE}-word shingles in train or an earlier "
              "test/validation document is dropped")


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


_B64 = {c: i for i, c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(field: bytes) -> int:
    """dictd's index numbers: base 64, most significant digit first."""
    n = 0
    for c in field:
        n = n * 64 + _B64[c]
    return n


def read_gcide(directory: Path = GCIDE_DIR) -> list[bytes]:
    """Every entry of the dictionary once, in file order; the `00-database-*` header entries
    (the database's own description and licence notice) are not dictionary text and are left out."""
    data, index = directory / "gcide.dict.dz", directory / "gcide.index"
    if not data.is_file() or not index.is_file():
        raise UsageError(f"gcide not found at {directory} (gcide.dict.dz and gcide.index): install it with "
                         "`apt-get install dict-gcide` (or set GQA_GCIDE_DIR)")
    try:
        text = gzip.decompress(data.read_bytes())  # dictzip is gzip with a seek table
    except (OSError, EOFError) as exc:
        raise UsageError(f"{data} is not a dictzip file ({exc})") from None
    spans = set()
    for line in index.read_bytes().splitlines():
        parts = line.split(b"\t")
        if len(parts) < 3 or parts[0].startswith(b"00-database") or parts[0].startswith(b"00database"):
            continue
        try:
            spans.add((_dictd_number(parts[1]), _dictd_number(parts[2])))
        except KeyError:
            raise UsageError(f"{index}: line {line[:60]!r} is not a dictd index line") from None
    out = [text[a:a + n].strip() for a, n in sorted(spans) if a + n <= len(text)]
    out = [e for e in out if e]
    if not out:
        raise UsageError(f"no entries in {data}")
    return out


CORPORA: dict[str, tuple[Callable[[], list[bytes]], str]] = {
    "fortunes": (lambda: read_fortunes(FORTUNES_DIR), "Debian fortunes"),
    "gcide": (lambda: read_gcide(GCIDE_DIR), "Debian dict-gcide (GCIDE 0.48)"),
}


def normalised(document: bytes) -> bytes:
    return b" ".join(document.lower().split())


def _digest(text: bytes) -> bytes:
    # not hash(): bytes hash differently in every process, and the split must not
    return hashlib.blake2b(text, digest_size=8).digest()


def shingles(key: bytes, n: int = SHINGLE) -> set[bytes]:
    """Digests of a normalised text's n-word windows (the whole text when it is shorter)."""
    words = key.split()
    if len(words) <= n:
        return {_digest(key)}
    return {_digest(b" ".join(words[i:i + n])) for i in range(len(words) - n + 1)}


def split_of(i: int) -> str:
    return "test" if i % 20 == 0 else "val" if i % 20 == 1 else "train"


def split_documents(documents: list[bytes]) -> tuple[dict[str, list[bytes]], int, int]:
    """(documents per split, exact repeats dropped, near-duplicate evaluation documents dropped)."""
    parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
    seen: set[bytes] = set()
    kept: list[tuple[str, bytes, set[bytes]]] = []
    exact = 0
    for i, d in enumerate(documents):
        key = normalised(d)
        if key in seen:
            exact += 1
            continue
        seen.add(key)
        kept.append((split_of(i), d, shingles(key)))
    seen_shingles: set[bytes] = set()  # train's first, then each evaluation document kept
    for split, _, s in kept:
        if split == "train":
            seen_shingles |= s
    near = 0
    for split, d, s in kept:
        if split != "train":
            if len(s & seen_shingles) >= NEAR * len(s):
                near += 1
                continue
            seen_shingles |= s
        parts[split].append(d)
    return parts, exact, near


_CACHE: dict[tuple[str, str], Corpus] = {}


def load_corpus(name: str = "fortunes") -> Corpus:
    if name not in CORPORA:
        raise UsageError(f"unknown corpus {name!r}: choose one of {', '.join(CORPORA)}")
    reader, source = CORPORA[name]
    documents = reader()
    digest = hashlib.sha256(b"".join(documents)).hexdigest()[:16]
    if (name, digest) in _CACHE:  # gcide's split takes seconds; a study loads it per call
        return _CACHE[(name, digest)]
    parts, exact, near = split_documents(documents)
    streams = {k: torch.frombuffer(bytearray(SEPARATOR.join(v)), dtype=torch.uint8).long() for k, v in parts.items()}
    directory = FORTUNES_DIR if name == "fortunes" else GCIDE_DIR
    unit = "fortunes" if name == "fortunes" else "documents"
    info = {"corpus": name, "source": str(directory), "package": source, unit: len(documents),
            "duplicates_dropped": exact, "near_duplicates_dropped": near, "split_rule": SPLIT_RULE,
            "sha256_16": digest, **{f"{k}_{unit}": len(v) for k, v in parts.items()},
            **{f"{k}_bytes": int(s.numel()) for k, s in streams.items()}}
    corpus = Corpus(streams["train"], streams["val"], streams["test"], info)
    _CACHE[(name, digest)] = corpus
    return corpus


def random_windows(stream: torch.Tensor, length: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, length + 1) random windows: inputs and their next-byte targets."""
    starts = torch.randint(0, stream.numel() - length - 1, (batch,), generator=generator)
    return torch.stack([stream[s:s + length + 1] for s in starts.tolist()])


def eval_windows(stream: torch.Tensor, length: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping (n, length + 1) windows of the stream (the last partial one dropped): all
    of them, or `limit` of them spread evenly over the stream. Spread, not the first ones: the
    documents sit in source-file order, so the first windows would all come from the first few
    files, while evenly spaced ones sample every file in proportion to its share of the text."""
    n = (stream.numel() - 1) // length
    starts = torch.arange(n)
    if limit is not None and limit < n:
        starts = torch.div(torch.arange(limit) * n, limit, rounding_mode="floor")
    idx = starts[:, None] * length + torch.arange(length + 1)[None, :]
    return stream[idx]
