"""Per-worker batch streams: packing, the validation split, i.i.d. / non-i.i.d. partitions,
exact resume and host-side prefetch.

The interface the training loop relies on (both dataset kinds below):

- `build_dataset(name, path, *, seq_len, num_workers, batch_per_worker, ...) ->
  (dataset, tokenizer)`; `dataset.vocab_size` follows the tokenizer;
- `dataset.train_batch(step) -> np.ndarray int32 [K, B / K, T + 1]`: row block k comes from
  worker k's own stream; DDP sees the same global batch;
- `dataset.eval_batches() -> list of [K, b, T + 1]`: a fixed held-out set;
- `dataset.state_dict() -> dict` (small, JSON-able): the position of every worker's stream
  before the next batch; `dataset.load_state_dict(d) -> step` restores it (and checks that
  corpus, tokenizer, partition and batch shape are the ones it was saved with);
- `Prefetcher(dataset, start_step, depth)` yields `(step, batch)` from a thread;
  `prefetcher.state_dict(step)` is the state to checkpoint after `step` steps were consumed.

`PackedDataset` (shakespeare, kjv, text: corpora held in memory) packs each domain's documents,
each followed by the separator, into non-overlapping windows of T + 1 tokens. A fixed seed holds
out `val_fraction` of the windows (the same validation set whatever the training seed); the rest
is partitioned among the workers, disjointly. Worker k walks its windows in a seeded
permutation per epoch; step s takes positions [s b, (s + 1) b) of that order. So a batch is a
pure function of (seed, step): the stream position IS the step.

`StreamDataset` (c4, tfds: corpora too large to hold) reads documents through the tfds
data source in a seeded pseudo-random order, worker k taking every K-th, tokenizes them on the
fly and packs them into its own token stream. Its position is explicit: per worker, the
document it is in and the token offset within it. Batches must be drawn in order; resuming
means `load_state_dict`.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import queue
import threading
from typing import Any, Callable

import numpy as np

from lsgd_jax import corpora
from lsgd_jax.tokenizers import ByteTokenizer, build_tokenizer  # noqa: F401  (re-exported)

DATASETS = corpora.CORPORA
NON_IID = ("none", "domain", "dirichlet")
SPLIT_SEED = 20240913  # the validation windows do not depend on the training seed


# ---------------------------------------------------------------------------------------------
# Tokenizing and packing an in-memory corpus.


def tokenize_corpus(load: Callable[[], tuple[list[str], list[str]]], tokenizer,
                    cache_path: str | None):
  """(tokens, bounds, names): each domain's documents + separators, concatenated by domain.

  `load()` gives the documents' texts and domains. Domains keep their order of first
  appearance; `tokens[bounds[d]:bounds[d + 1]]` is domain d. With `cache_path` the result is
  stored there (npz) and reused without loading the texts.
  """
  if cache_path and os.path.isfile(cache_path):
    with np.load(cache_path) as z:
      return z["tokens"], z["bounds"], [str(n) for n in z["names"]]
  texts, domains = load()
  names = list(dict.fromkeys(domains))
  index = {n: i for i, n in enumerate(names)}
  pieces: list[list[np.ndarray]] = [[] for _ in names]
  eos = np.array([tokenizer.eos_id], np.int32)
  for lo in range(0, len(texts), 512):
    for ids, dom in zip(tokenizer.encode_batch(texts[lo:lo + 512]), domains[lo:lo + 512]):
      pieces[index[dom]] += [ids, eos]
  dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
  per_domain = [np.concatenate(p).astype(dtype) for p in pieces]
  bounds = np.concatenate([[0], np.cumsum([len(p) for p in per_domain])]).astype(np.int64)
  tokens = np.concatenate(per_domain)
  if cache_path:
    tmp = f"{cache_path}.tmp{os.getpid()}.npz"
    np.savez(tmp, tokens=tokens, bounds=bounds, names=np.array(names))
    os.replace(tmp, cache_path)
  return tokens, bounds, names


def make_windows(bounds: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Start offsets and domains of the non-overlapping `width`-token windows of each domain."""
  starts, doms = [], []
  for d in range(len(bounds) - 1):
    n = int(bounds[d + 1] - bounds[d]) // width
    starts.append(bounds[d] + width * np.arange(n, dtype=np.int64))
    doms.append(np.full(n, d, np.int32))
  return np.concatenate(starts), np.concatenate(doms)


_BOUNDARY_NOTE = ("sequences never cross from one document to the next (a file, or a value of "
                  "data.domain_field)")


def _warn_unused(tokens: np.ndarray, bounds: np.ndarray, used: int, width: int,
                 threshold: float = 0.8) -> None:
  """A line when whole windows cover less than `threshold` of the corpus (short documents)."""
  if not len(tokens) or used >= threshold * len(tokens):
    return
  sizes = np.diff(bounds)
  short = int(np.sum(sizes < width))
  share = 100 * used / len(tokens)
  print(f"WARNING: {used:,} of the corpus's {len(tokens):,} tokens ({share:.0f}%) "
        f"are trained on or held out: {_BOUNDARY_NOTE}, so each document's last "
        f"{width - 1} tokens at most are left out, and {short} of {len(sizes)} documents are "
        f"shorter than one sequence of {width} tokens. Join small files or use a shorter "
        "data.seq_len to use more of it.", flush=True)


def split_windows(n: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """(train, val) window indices: a fixed random `val_fraction` (at least one) is held out."""
  order = np.random.default_rng(SPLIT_SEED).permutation(n)
  n_val = max(1, math.ceil(n * val_fraction))
  if n - n_val < 1:
    raise ValueError(f"The corpus has {n} window(s): too short for a train and a validation "
                     "split; use more text or a shorter data.seq_len.")
  return np.sort(order[n_val:]), order[:n_val]


def partition(domains: np.ndarray, num_workers: int, mode: str = "none", alpha: float = 1.0,
              seed: int = 0) -> list[np.ndarray]:
  """Splits items (with domain labels) among workers, disjointly and covering all of them.

  - "none": i.i.d., a seeded permutation dealt round-robin;
  - "domain": each domain goes whole to one worker (largest first, to the least loaded);
  - "dirichlet": each domain's items are split among workers in shares q ~ Dir(alpha 1_K)
    (small alpha: each domain lives on few workers; large alpha: close to i.i.d.).
  """
  n, K = len(domains), num_workers
  rng = np.random.default_rng([seed, 1])
  if mode == "none":
    perm = rng.permutation(n)
    return [np.sort(perm[k::K]) for k in range(K)]
  num_domains = int(domains.max()) + 1 if n else 0
  order = np.argsort(domains, kind="stable")
  by_domain = np.split(order, np.cumsum(np.bincount(domains, minlength=num_domains))[:-1])
  parts: list[list[np.ndarray]] = [[] for _ in range(K)]
  if mode == "domain":
    present = [d for d in range(num_domains) if len(by_domain[d])]
    if len(present) < K:
      raise ValueError(f"data.non_iid='domain' gives each worker whole domains, but the training "
                       f"split has {len(present)} domains for {K} workers.")
    load = np.zeros(K, np.int64)
    for d in sorted(present, key=lambda d: (-len(by_domain[d]), d)):
      k = int(np.argmin(load))
      parts[k].append(by_domain[d])
      load[k] += len(by_domain[d])
  elif mode == "dirichlet":
    if not alpha > 0:
      raise ValueError(f"data.dirichlet_alpha must be positive, got {alpha}.")
    for d, items in enumerate(by_domain):
      q = rng.dirichlet(np.full(K, float(alpha)))
      cuts = np.round(np.cumsum(q)[:-1] * len(items)).astype(np.int64)
      for k, piece in enumerate(np.split(rng.permutation(items), cuts)):
        parts[k].append(piece)
  else:
    raise ValueError(f"Unknown data.non_iid {mode!r}; allowed: {', '.join(NON_IID)}.")
  return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def _spec_mismatch(saved: dict, spec: dict) -> None:
  diff = [f"{k}: saved {saved.get(k)!r}, now {spec.get(k)!r}"
          for k in sorted(set(saved) | set(spec)) if saved.get(k) != spec.get(k)]
  if diff:
    raise ValueError("The data state belongs to another data set-up, so its streams would differ: "
                     + "; ".join(diff) + ".")


class PackedDataset:
  """Windows of an in-memory token array, partitioned among workers; batches are pure in step."""

  def __init__(self, tokens: np.ndarray, starts: np.ndarray, worker_windows: list[np.ndarray],
               val_windows: np.ndarray, *, vocab_size: int, seq_len: int, batch_per_worker: int,
               seed: int = 0, eval_batch_per_worker: int = 1, num_eval_batches: int = 1,
               spec: dict | None = None, window_domains: np.ndarray | None = None):
    self.tokens, self.starts = tokens, starts
    self.window_domains = window_domains  # domain of each window (for non-i.i.d. statistics)
    self.worker_windows = worker_windows  # per worker: indices into `starts`, disjoint
    self.val_windows = val_windows
    self.vocab_size, self.seq_len = vocab_size, seq_len
    self.num_workers, self.batch_per_worker = len(worker_windows), batch_per_worker
    self.seed = seed
    self.eval_batch_per_worker, self.num_eval_batches = eval_batch_per_worker, num_eval_batches
    self.spec = dict(spec or {})
    self.next_step = 0
    for k, w in enumerate(worker_windows):
      if len(w) < batch_per_worker:
        raise ValueError(
            f"Worker {k} has {len(w)} training sequences of {seq_len + 1} tokens, fewer than its "
            f"batch of {batch_per_worker}: the corpus ({len(starts)} sequences in all) is too "
            "short for this many workers and this batch; use more text, a shorter "
            "data.seq_len, a smaller batch, or a milder non-i.i.d. split.")
    self._orders: dict[tuple[int, int], np.ndarray] = {}

  def _order(self, k: int, epoch: int) -> np.ndarray:
    key = (k, epoch)
    if key not in self._orders:
      if len(self._orders) > 4 * self.num_workers:
        self._orders.clear()
      self._orders[key] = np.random.default_rng([self.seed, 2, k, epoch]).permutation(
          len(self.worker_windows[k]))
    return self._orders[key]

  def worker_starts(self, k: int, step: int) -> np.ndarray:
    """Token offsets of worker k's rows at `step`."""
    n, b = len(self.worker_windows[k]), self.batch_per_worker
    pos = step * b + np.arange(b)
    epoch, idx = pos // n, pos % n
    rows = np.empty(b, np.int64)
    for e in np.unique(epoch):
      sel = epoch == e
      rows[sel] = self.worker_windows[k][self._order(k, int(e))[idx[sel]]]
    return self.starts[rows]

  def train_batch(self, step: int) -> np.ndarray:
    starts = np.stack([self.worker_starts(k, step) for k in range(self.num_workers)])
    self.next_step = step + 1
    return self.tokens[starts[..., None] + np.arange(self.seq_len + 1)].astype(np.int32)

  def eval_batches(self) -> list[np.ndarray]:
    k, b, w = self.num_workers, self.eval_batch_per_worker, self.seq_len + 1
    need = self.num_eval_batches * k * b
    starts = self.starts[np.resize(self.val_windows, need)]  # cycles if the split is smaller
    windows = self.tokens[starts[:, None] + np.arange(w)].astype(np.int32)
    return list(windows.reshape(self.num_eval_batches, k, b, w))

  def state_dict(self) -> dict:
    step, b = self.next_step, self.batch_per_worker
    workers = [{"epoch": step * b // len(w), "offset": step * b % len(w)}
               for w in self.worker_windows]
    return {"kind": "packed", "step": step, "spec": self.spec, "workers": workers}

  def load_state_dict(self, state: dict) -> int:
    _spec_mismatch(state.get("spec", {}), self.spec)
    self.next_step = int(state["step"])
    return self.next_step


# ---------------------------------------------------------------------------------------------
# Streaming a tfds corpus too large to hold.


def _permute(i: np.ndarray, n: int, key: int) -> np.ndarray:
  """A seeded bijection of [0, n): a 4-round Feistel network with cycle walking."""
  half = max(1, math.ceil(math.ceil(math.log2(max(n, 2))) / 2))
  mask = np.uint64((1 << half) - 1)
  keys = np.random.default_rng([key, 3]).integers(0, 1 << 62, size=4, dtype=np.uint64)
  x = np.asarray(i, np.uint64)
  todo = np.ones(x.shape, bool)
  with np.errstate(over="ignore"):
    while todo.any():
      left, right = x[todo] >> np.uint64(half), x[todo] & mask
      for rk in keys:
        f = ((right ^ rk) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - half)
        left, right = right, (left ^ f) & mask
      x[todo] = (left << np.uint64(half)) | right
      todo = x >= np.uint64(n)
  return x.astype(np.int64)


class StreamDataset:
  """Documents read on demand from tfds data sources, packed per worker; explicit position."""

  def __init__(self, train_source, val_source, tokenizer, *, text_field: str, seq_len: int,
               num_workers: int, batch_per_worker: int, seed: int = 0,
               eval_batch_per_worker: int = 1, num_eval_batches: int = 1,
               spec: dict | None = None, read_ahead: int = 64):
    self.train_source, self.val_source, self.tokenizer = train_source, val_source, tokenizer
    self.text_field = text_field
    self.vocab_size, self.seq_len = tokenizer.vocab_size, seq_len
    self.num_workers, self.batch_per_worker, self.seed = num_workers, batch_per_worker, seed
    self.eval_batch_per_worker, self.num_eval_batches = eval_batch_per_worker, num_eval_batches
    self.spec = dict(spec or {})
    self.read_ahead = read_ahead
    self.num_docs = len(train_source)
    if self.num_docs < num_workers:
      raise ValueError(f"The training split has {self.num_docs} documents for {num_workers} "
                       "workers.")
    self._val: list[np.ndarray] | None = None
    self._recent: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self._reset([[0, 0] for _ in range(num_workers)], 0)

  def _reset(self, positions: list[list[int]], step: int) -> None:
    self._pos = [list(p) for p in positions]  # per worker: [document number, token offset]
    self._ahead = [collections.deque() for _ in range(self.num_workers)]  # tokens of docs j, ...
    self.next_step = step
    self._recent.clear()

  def _doc_ids(self, k: int, first: int, count: int) -> np.ndarray:
    """Global indices of worker k's documents number first .. first + count - 1."""
    K, n = self.num_workers, self.num_docs
    per_worker = (n - k + K - 1) // K  # documents g = k, k + K, ... below n
    j = np.arange(first, first + count)
    epoch, local = j // per_worker, j % per_worker
    out = np.empty(count, np.int64)
    for e in np.unique(epoch):
      sel = epoch == e
      out[sel] = _permute(k + K * local[sel], n, self.seed * 1_000_003 + int(e))
    return out

  def _texts(self, source, ids) -> list[str]:
    records = source.__getitems__([int(i) for i in ids])
    out = []
    for r in records:
      t = r[self.text_field] if self.text_field in r else None
      if t is None:
        raise ValueError(f"The tfds dataset has no feature {self.text_field!r}; its features: "
                         f"{sorted(r)}. Set data.text_field.")
      out.append(t.decode("utf-8") if isinstance(t, bytes) else str(t))
    return out

  def _encode(self, texts: list[str]) -> list[np.ndarray]:
    eos = np.array([self.tokenizer.eos_id], np.int32)
    return [np.concatenate([ids, eos]) for ids in self.tokenizer.encode_batch(texts)]

  def _take(self, k: int, count: int) -> np.ndarray:
    """The next `count` tokens of worker k's stream; advances its position."""
    out, pos, ahead = [], self._pos[k], self._ahead[k]
    while count > 0:
      if not ahead:
        ids = self._doc_ids(k, pos[0], self.read_ahead)
        ahead.extend(self._encode(self._texts(self.train_source, ids)))
      doc = ahead[0]
      piece = doc[pos[1]:pos[1] + count]
      out.append(piece)
      count -= len(piece)
      pos[1] += len(piece)
      if pos[1] >= len(doc):
        ahead.popleft()
        pos[0], pos[1] = pos[0] + 1, 0
    return np.concatenate(out)

  def train_batch(self, step: int) -> np.ndarray:
    if step in self._recent:
      return self._recent[step]
    if step != self.next_step:
      raise ValueError(f"This streamed dataset is read in order: the next batch is step "
                       f"{self.next_step}, not {step}. To resume, load_state_dict() the state "
                       "saved with the checkpoint.")
    w, b = self.seq_len + 1, self.batch_per_worker
    batch = np.stack([self._take(k, b * w).reshape(b, w) for k in range(self.num_workers)])
    self._recent[step] = batch
    if len(self._recent) > 4:
      self._recent.popitem(last=False)
    self.next_step = step + 1
    return batch

  def eval_batches(self) -> list[np.ndarray]:
    """The first validation documents, in index order, packed into the needed windows."""
    if self._val is None:
      k, b, w = self.num_workers, self.eval_batch_per_worker, self.seq_len + 1
      need = self.num_eval_batches * k * b * w
      pieces, have, i, n = [], 0, 0, len(self.val_source)
      if n == 0:
        raise ValueError("The validation split has no documents.")
      while have < need and i < n:
        ids = range(i, min(i + 256, n))
        for t in self._encode(self._texts(self.val_source, ids)):
          pieces.append(t)
          have += len(t)
        i += 256
      tokens = np.resize(np.concatenate(pieces), need)  # cycles if the split is smaller
      self._val = list(tokens.reshape(self.num_eval_batches, k, b, w))
    return self._val

  def state_dict(self) -> dict:
    return {"kind": "stream", "step": self.next_step, "spec": self.spec,
            "workers": [{"doc": p[0], "offset": p[1]} for p in self._pos]}

  def load_state_dict(self, state: dict) -> int:
    _spec_mismatch(state.get("spec", {}), self.spec)
    self._reset([[w["doc"], w["offset"]] for w in state["workers"]], int(state["step"]))
    return self.next_step


Dataset = PackedDataset | StreamDataset


# ---------------------------------------------------------------------------------------------
# Host-side prefetch.


class Prefetcher:
  """Draws `dataset.train_batch(step)` for step = start_step, start_step + 1, ... in a thread.

  Iterating yields `(step, batch)`. `state_dict(step)` is the dataset state from which the
  batch of `step` is drawn next: checkpoint it with the model after `step` steps.
  """

  def __init__(self, dataset, start_step: int = 0, depth: int = 2):
    if isinstance(dataset, PackedDataset):
      dataset.next_step = start_step  # batches are pure in the step: any start is exact
    elif dataset.next_step != start_step:
      raise ValueError(f"The streamed dataset's next batch is step {dataset.next_step}, not "
                       f"{start_step}: load_state_dict() the state saved at step {start_step}.")
    self.dataset = dataset
    self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    self._stop = threading.Event()
    self._states = {start_step: dataset.state_dict()}
    self._lock = threading.Lock()
    self._thread = threading.Thread(target=self._run, args=(start_step,), daemon=True,
                                    name="lsgd-prefetch")
    self._thread.start()

  def _run(self, step: int) -> None:
    try:
      while not self._stop.is_set():
        batch = self.dataset.train_batch(step)
        with self._lock:
          self._states[step + 1] = self.dataset.state_dict()
        while not self._stop.is_set():
          try:
            self._queue.put((step, batch), timeout=0.1)
            break
          except queue.Full:
            pass
        step += 1
    except BaseException as e:  # handed to the consumer, raised by __next__
      self._queue.put((None, e))

  def __iter__(self):
    return self

  def __next__(self) -> tuple[int, np.ndarray]:
    step, batch = self._queue.get()
    if step is None:
      raise batch
    with self._lock:
      for s in [s for s in self._states if s < step]:
        del self._states[s]
    return step, batch

  def state_dict(self, step: int) -> dict[str, Any]:
    with self._lock:
      if step not in self._states:
        raise KeyError(f"No data state for step {step}: it is not the next step to consume.")
      return self._states[step]

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ---------------------------------------------------------------------------------------------
# Building a dataset from the config's values.


def build_dataset(name: str, path: str = "", *, seq_len: int, num_workers: int,
                  batch_per_worker: int, seed: int = 0, val_fraction: float = 0.05,
                  eval_batch_per_worker: int = 1, num_eval_batches: int = 1,
                  data_dir: str = "", tokenizer: str = "byte", vocab_size: int = 4096,
                  text_field: str = "text", domain_field: str = "", non_iid: str = "none",
                  dirichlet_alpha: float = 1.0):
  """The corpus `name` tokenized and split per worker: returns (dataset, tokenizer)."""
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; allowed: {', '.join(DATASETS)}.")
  if non_iid not in NON_IID:
    raise ValueError(f"Unknown data.non_iid {non_iid!r}; allowed: {', '.join(NON_IID)}.")
  data_dir = os.path.expanduser(data_dir or corpora.default_data_dir())
  spec = {"corpus": name, "seq_len": seq_len, "num_workers": num_workers,
          "batch_per_worker": batch_per_worker, "seed": seed, "non_iid": non_iid,
          "dirichlet_alpha": dirichlet_alpha if non_iid == "dirichlet" else None}
  shape = dict(seq_len=seq_len, batch_per_worker=batch_per_worker, seed=seed,
               eval_batch_per_worker=eval_batch_per_worker, num_eval_batches=num_eval_batches)
  if name in corpora.IN_MEMORY:
    source = {"shakespeare": corpora.shakespeare_source, "kjv": corpora.kjv_source}.get(
        name, lambda: corpora.local_source(path, text_field, domain_field))()
    builder = corpora.build_corpus(source, data_dir)
    cache = os.fspath(builder.data_dir)
    load = functools.cache(lambda: corpora.read_documents(builder))
    tok = build_tokenizer(tokenizer, vocab_size=vocab_size, cache_dir=cache,
                          texts=(t for t in load()[0]))
    token_cache = (None if tok.identity == "byte" else
                   os.path.join(cache, f"tokens-{tok.identity.replace(':', '-')}.npz"))
    tokens, bounds, _ = tokenize_corpus(load, tok, token_cache)
    starts, window_domains = make_windows(bounds, seq_len + 1)
    if len(starts) < 2:
      raise ValueError(f"The corpus {name!r} has {len(tokens)} tokens, but {len(starts)} "
                       f"sequence(s) of {seq_len + 1} tokens within one document: "
                       f"{_BOUNDARY_NOTE}; two are needed (one to train on, one to validate "
                       "on). Use longer documents (e.g. join small files) or a shorter "
                       "data.seq_len.")
    _warn_unused(tokens, bounds, len(starts) * (seq_len + 1), seq_len + 1)
    train, val = split_windows(len(starts), val_fraction)
    parts = partition(window_domains[train], num_workers, non_iid, dirichlet_alpha, seed)
    spec.update(corpus=f"{name}/{source.name}", tokenizer=tok.identity, windows=len(starts))
    ds = PackedDataset(tokens, starts, [train[p] for p in parts], val, vocab_size=tok.vocab_size,
                       spec=spec, window_domains=window_domains, **shape)
    return ds, tok
  # Streamed tfds corpora (C4, ...): prepared in array_record under data_dir.
  if non_iid != "none":
    raise ValueError(f"data.non_iid={non_iid!r} needs a corpus held in memory with domain labels "
                     "(shakespeare, kjv, text); streamed tfds corpora are split i.i.d.")
  tfds_name = path or (corpora.C4_DEFAULT if name == "c4" else "")
  if not tfds_name:
    raise ValueError("data.name='tfds' needs data.path='NAME/CONFIG:VERSION' of a tfds dataset "
                     "prepared in data.data_dir.")
  builder = corpora.open_tfds(data_dir, tfds_name)
  splits = set(builder.info.splits)
  val_split = next((s for s in ("validation", "test") if s in splits), None)
  if "train" not in splits or val_split is None:
    raise ValueError(f"{tfds_name} has splits {sorted(splits)}; it needs 'train' and "
                     "'validation' (or 'test').")
  local = not data_dir.startswith(("gs://", "s3://"))
  tok = build_tokenizer(
      tokenizer, vocab_size=vocab_size, cache_dir=os.fspath(builder.data_dir) if local else None,
      texts=_first_texts(corpora.data_source(builder, "train"), text_field))
  spec.update(corpus=tfds_name, tokenizer=tok.identity)
  ds = StreamDataset(corpora.data_source(builder, "train"), corpora.data_source(builder, val_split),
                     tok, text_field=text_field, num_workers=num_workers, spec=spec, **shape)
  return ds, tok


def _first_texts(source, text_field: str, max_docs: int = 200_000):
  """Texts of the first documents (to train a SentencePiece model on a streamed corpus)."""
  for lo in range(0, min(len(source), max_docs), 1024):
    for r in source.__getitems__(range(lo, min(lo + 1024, len(source), max_docs))):
      t = r.get(text_field)
      if t is None:
        raise ValueError(f"The tfds dataset has no feature {text_field!r}; its features: "
                         f"{sorted(r)}. Set data.text_field.")
      yield t.decode("utf-8") if isinstance(t, bytes) else str(t)
