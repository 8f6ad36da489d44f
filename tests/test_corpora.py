"""The corpora: the dictd reader on a small dictionary built here (and on the real gcide when
it is installed), the near-duplicate rule, the checkpoint's corpus read back for evaluation."""
import base64
import gzip

import pytest
import torch

from gqa_lut.errors import UsageError
from retnet_integration import data
from retnet_integration.data import GCIDE_DIR, load_corpus, read_gcide, split_documents
from retnet_integration.experiments.pipeline import checkpoint_config

B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_number(n: int) -> bytes:
    out = b""
    while True:
        out = B64[n % 64:n % 64 + 1] + out
        n //= 64
        if not n:
            return out


def write_dict(folder, entries: list[tuple[bytes, bytes]], header: bytes = b"00-database-info\nGCIDE\n") -> None:
    """A dictd dictionary: the text gzip'd (dictzip is gzip), an index of headword, offset, length."""
    text, index = header, [b"00-database-info\tA\t" + dictd_number(len(header))]
    for word, body in entries:
        index.append(word + b"\t" + dictd_number(len(text)) + b"\t" + dictd_number(len(body)))
        text += body
    # a headword listed twice (an inflected form pointing at the same entry) is one document
    index.append(b"alias\t" + index[1].split(b"\t", 1)[1])
    (folder / "gcide.dict.dz").write_bytes(gzip.compress(text))
    (folder / "gcide.index").write_bytes(b"\n".join(sorted(index)) + b"\n")


def test_dictd_numbers_are_base64_digits():
    for n in (0, 1, 63, 64, 4095, 123_456_789):
        assert data._dictd_number(dictd_number(n)) == n
    assert base64.b64decode(b"AAAB")[-1] == 1 and data._dictd_number(b"B") == 1


def test_read_gcide_gives_every_entry_once_without_the_header(tmp_path):
    entries = [(b"apple", b"Apple \\n A fruit of the tree.\n\n"), (b"bee", b"Bee \\n An insect that makes honey.\n\n"),
               (b"cat", b"Cat \\n A small domesticated feline.\n\n")]
    write_dict(tmp_path, entries)
    docs = read_gcide(tmp_path)
    assert docs == [body.strip() for _, body in entries]  # file order, header entry left out, alias once


def test_read_gcide_refuses_missing_and_broken_files(tmp_path):
    with pytest.raises(UsageError, match="apt-get install dict-gcide"):
        read_gcide(tmp_path)
    (tmp_path / "gcide.dict.dz").write_bytes(b"not gzip")
    (tmp_path / "gcide.index").write_bytes(b"a\tA\tB\n")
    with pytest.raises(UsageError, match="is not a dictzip file"):
        read_gcide(tmp_path)
    write_dict(tmp_path, [(b"a", b"Some text.")])
    (tmp_path / "gcide.index").write_bytes(b"a\t!!\tB\n")
    with pytest.raises(UsageError, match="is not a dictd index line"):
        read_gcide(tmp_path)
    with pytest.raises(UsageError, match="unknown corpus 'wiki'"):
        load_corpus("wiki")


def test_near_duplicates_leave_the_evaluation_splits_and_train_stays():
    words = [f"w{i}" for i in range(40)]
    base = " ".join(words).encode()
    docs = [f"doc {i} {'x ' * 3}".encode() + b" ".join(w.encode() + str(i).encode() for w in words)
            for i in range(60)]
    docs[2] = base  # train (2 % 20 is neither 0 nor 1)
    docs[20] = base.replace(b"w39", b"w39 -- a quote with another attribution")  # test: a near-duplicate
    docs[21] = docs[5].upper()  # validation: an exact repeat once normalised
    parts, exact, near = split_documents(docs)
    assert exact == 1 and near == 1
    assert docs[20] not in parts["test"] and base in parts["train"] and docs[0] in parts["test"]
    assert len(parts["train"]) == sum(1 for i in range(60) if i % 20 > 1)  # nothing left train
    again = split_documents(docs)
    assert again == (parts, exact, near)  # deterministic (no per-process hashing)


def test_checkpoint_config_reads_the_corpus_and_seed_it_was_trained_with():
    assert checkpoint_config({"preset": "cpu"}).corpus == "fortunes"  # older checkpoints: fortunes
    cfg = checkpoint_config({"preset": "gpu", "train": {"corpus": "gcide", "seed": 2}})
    assert (cfg.corpus, cfg.seed, cfg.seq_len) == ("gcide", 2, 256)


@pytest.mark.slow
@pytest.mark.skipif(not (GCIDE_DIR / "gcide.index").is_file(), reason="apt-get install dict-gcide (.ci/run does)")
def test_real_gcide_is_large_and_split_without_overlap():
    c = load_corpus("gcide")
    assert c.info["documents"] > 100_000 and c.info["train_bytes"] > 30_000_000
    assert c.info["test_bytes"] > 1_500_000 and c.info["near_duplicates_dropped"] >= 0
    assert c.info["test_documents"] + c.info["val_documents"] + c.info["train_documents"] + c.info[
        "duplicates_dropped"] + c.info["near_duplicates_dropped"] == c.info["documents"]
    assert torch.equal(load_corpus("gcide").test, c.test)  # the cache gives the same split
