"""Documents -> tokens -> packed fixed-length rows -> a resumable, seeded batch stream.

Sources: the running interpreter's standard-library sources (present on every machine), or
text files, folders and JSONL. Documents are packed back to back into rows of ``seq_len + 1``
tokens with their document ids, so attention and the loss never cross a document boundary.
The held-out split is by a hash of each document's name, stable across runs and machines.
"""

from __future__ import annotations

import json
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moelab.train.loss import IGNORE_LABEL

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to download."""

    vocab_size = 256
    eos_id: int | None = None

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


class ModelTokenizer:
    """A checkpoint's ``tokenizer.json`` through the ``tokenizers`` package (optional extra)."""

    def __init__(self, model_path: str | Path, eos_id: int | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ValueError("data.tokenizer=model needs the `tokenizers` package") from e
        file = Path(model_path) / "tokenizer.json"
        if not file.exists():
            raise ValueError(f"{file} does not exist (data.tokenizer=model)")
        self._tok = Tokenizer.from_file(str(file))
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_id = eos_id

    def encode(self, text: str) -> np.ndarray:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.eos_id is not None:
            ids.append(self.eos_id)
        return np.asarray(ids, dtype=np.int64)


def stdlib_documents(max_bytes: int) -> list[tuple[str, str]]:
    """``(relative path, source)`` of the standard library's modules, tests excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root).as_posix()
        if "site-packages" in rel or "/test" in f"/{rel}" or "tests/" in rel:
            continue
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append((rel, text))
        total += len(text)
        if total >= max_bytes:
            break
    if not docs:
        raise ValueError(f"no standard-library sources found under {root}")
    return docs


def file_documents(path: str | Path, text_field: str = "text") -> list[tuple[str, str]]:
    """Documents of a text file, a folder (recursively) or a JSONL file (one per line)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES + (".jsonl",))
        return [doc for f in files for doc in file_documents(f, text_field)]
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            record = json.loads(line)
            if text_field not in record:
                raise ValueError(f"{path}:{i + 1} has no {text_field!r} field")
            docs.append((f"{path.name}:{i}", str(record[text_field])))
        return docs
    return [(path.name, path.read_text(encoding="utf-8"))]


def split_documents(
    docs: list[tuple[str, str]], eval_fraction: float
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Train and held-out documents, chosen by a hash of each name; a lone document (one text
    file) is split instead, its last ``eval_fraction`` held out from a line boundary on."""
    if not docs:
        raise ValueError("the data source holds no documents")
    if len(docs) == 1:
        name, text = docs[0]
        at = int(len(text) * (1.0 - eval_fraction))
        line = text.rfind("\n", 0, at) + 1  # a line boundary, where there is one near
        cut = line if at - line <= len(text) * eval_fraction / 2 else at
        return [(f"{name} (head)", text[:cut])], [(f"{name} (tail)", text[cut:])]
    bucket = int(eval_fraction * 10_000)
    train, held_out = [], []
    for doc in docs:
        (held_out if zlib.crc32(doc[0].encode()) % 10_000 < bucket else train).append(doc)
    if not held_out or not train:  # tiny corpora: keep both sides non-empty
        cut = max(1, int(len(docs) * eval_fraction))
        train, held_out = docs[cut:], docs[:cut]
    return train, held_out


@dataclass
class Packed:
    """``tokens`` and ``docs`` of shape ``[rows, seq_len + 1]`` (int64)."""

    tokens: torch.Tensor
    docs: torch.Tensor

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]


def pack(
    docs: list[tuple[str, str]], tokenizer: ByteTokenizer | ModelTokenizer, seq_len: int
) -> Packed:
    ids = [tokenizer.encode(text) for _, text in docs]
    ids = [a for a in ids if len(a)]
    if not ids:
        raise ValueError(f"the {len(docs)} documents hold no text")
    tokens = np.concatenate(ids)
    doc_ids = np.repeat(np.arange(len(ids)), [len(a) for a in ids])
    width = seq_len + 1
    rows = len(tokens) // width
    if rows == 0:
        raise ValueError(f"corpus of {len(tokens)} tokens is shorter than one row of {width}")
    cut = rows * width
    return Packed(
        torch.from_numpy(tokens[:cut].reshape(rows, width)),
        torch.from_numpy(doc_ids[:cut].reshape(rows, width)),
    )


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S]; -100 where the next token starts another document
    document_ids: torch.Tensor  # [B, S]

    def to(self, device: torch.device) -> Batch:
        return Batch(
            *(
                t.to(device, non_blocking=True)
                for t in (self.input_ids, self.labels, self.document_ids)
            )
        )


def make_batch(tokens: torch.Tensor, docs: torch.Tensor) -> Batch:
    labels = tokens[:, 1:].clone()
    labels[docs[:, 1:] != docs[:, :-1]] = IGNORE_LABEL
    return Batch(tokens[:, :-1], labels, docs[:, :-1])


class BatchStream:
    """Batches of ``batch_size`` rows in a seeded order, reshuffled every epoch; resumable."""

    def __init__(self, data: Packed, batch_size: int, seed: int):
        if data.rows < batch_size:
            raise ValueError(f"{data.rows} rows of data cannot fill a batch of {batch_size}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.data.rows, generator=g)

    def next(self) -> Batch:
        if self.cursor + self.batch_size > self.data.rows:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation()
        rows = self._order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return make_batch(self.data.tokens[rows], self.data.docs[rows])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self._order = self._permutation()


def eval_batches(data: Packed, batch_size: int, count: int) -> list[Batch]:
    """The first ``count`` batches of the held-out rows, in order (the same every eval)."""
    batches = []
    for start in range(0, min(data.rows, count * batch_size), batch_size):
        stop = min(start + batch_size, data.rows)
        batches.append(make_batch(data.tokens[start:stop], data.docs[start:stop]))
    return batches
