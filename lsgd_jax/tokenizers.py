"""Tokenizers: UTF-8 bytes, SentencePiece trained on the corpus, or a user's SentencePiece model.

Every tokenizer has `vocab_size`, `eos_id` (the separator appended to each document when
documents are packed into sequences), `identity` (a short string naming the exact vocabulary:
a checkpoint stores it, and restoring under another tokenizer is an error, see
`check_identity`), `encode(text) -> np.ndarray` and `decode(ids) -> str`. `encode` never adds
the separator, and `decode(encode(text)) == text` exactly for any text.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Iterable, Iterator

import numpy as np

TOKENIZERS = ("byte", "sentencepiece")  # or a path to a SentencePiece .model file


class ByteTokenizer:
  """UTF-8 bytes as tokens 0..255 and a separator 256: vocabulary 257, no files."""

  vocab_size = 257
  eos_id = 256
  identity = "byte"

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    return bytes(ids[ids < 256].astype(np.uint8).tolist()).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A SentencePiece model; `identity` is a hash of the model file's bytes."""

  def __init__(self, model_path: str):
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    if not os.path.isfile(model_path):
      raise FileNotFoundError(f"Tokenizer file {model_path!r} does not exist (data.tokenizer "
                              "takes 'byte', 'sentencepiece' or a path to a .model file).")
    with open(model_path, "rb") as f:
      proto = f.read()
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=proto)
    except Exception as e:  # sentencepiece raises RuntimeError or OSError, depending on version
      raise ValueError(f"Tokenizer file {model_path!r} is not a readable SentencePiece model: "
                       f"{e}") from e
    self.path = model_path
    self.vocab_size = int(self._sp.vocab_size())
    self.eos_id = int(self._sp.eos_id())
    if self.eos_id < 0:
      raise ValueError(f"SentencePiece model {model_path!r} has no end-of-sequence piece; "
                       "packing needs one to separate documents.")
    self.identity = f"sentencepiece:{hashlib.sha256(proto).hexdigest()[:16]}:{self.vocab_size}"

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(texts)]

  def decode(self, ids) -> str:
    ids = [int(i) for i in np.asarray(ids).ravel() if i != self.eos_id]
    return self._sp.decode(ids)


# SentencePiece's trainer skips every line longer than max_sentence_length (4,192 bytes) without a
# word: a corpus of long lines (CJK without line breaks, one paragraph per line) left it nothing
# to learn from. Lines are cut into pieces of at most this many characters (4 bytes each at most
# in UTF-8) for training; encoding is not limited.
_TRAIN_PIECE_CHARS = 1000


def _lines(texts: Iterable[str], max_chars: int) -> Iterator[str]:
  """Non-empty lines of the texts (SentencePiece trains on lines), long ones cut into pieces of
  at most `_TRAIN_PIECE_CHARS` (at a space where there is one), up to `max_chars` in all."""
  seen = 0
  for text in texts:
    for line in text.split("\n"):
      while line:
        piece = line[:_TRAIN_PIECE_CHARS]
        if len(line) > _TRAIN_PIECE_CHARS and " " in piece[1:]:
          piece = piece[:piece.rindex(" ")]  # the space starts the next piece, as in the text
        line = line[len(piece):]
        yield piece
        seen += len(piece)
        if seen >= max_chars:
          return


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_path: str, *,
                        max_chars: int = 50_000_000) -> str:
  """Trains a byte-fallback BPE model on `texts` and writes it to `model_path` atomically.

  Identity normalisation, no dummy prefix, whitespace kept, "\\n" a piece of its own, and byte
  fallback make the round trip exact for any text. At most `max_chars` characters are used.
  """
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  if vocab_size < 300:
    raise ValueError(f"data.vocab_size={vocab_size} is too small for a SentencePiece model with "
                     "byte fallback (256 byte pieces + specials); use at least 300.")
  buf = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts, max_chars), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, byte_fallback=True, unk_id=0, bos_id=-1, eos_id=1, pad_id=-1,
        user_defined_symbols=["\n"], allow_whitespace_only_pieces=True, split_digits=True,
        character_coverage=1.0, num_threads=max(os.cpu_count() or 1, 1),
        input_sentence_size=5_000_000, shuffle_input_sentence=True, minloglevel=2)
  except RuntimeError as e:
    raise ValueError(f"Training a SentencePiece vocabulary of {vocab_size} failed (a vocabulary "
                     f"larger than the corpus supports?): {e}") from e
  os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
  tmp = f"{model_path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(buf.getvalue())
  os.replace(tmp, model_path)
  return model_path


def build_tokenizer(spec: str, *, vocab_size: int, cache_dir: str | None,
                    texts: Iterable[str] | None = None):
  """'byte'; 'sentencepiece' (trained on `texts` once, cached in `cache_dir`); or a .model path."""
  if spec == "byte":
    return ByteTokenizer()
  if spec == "sentencepiece":
    if cache_dir is None:
      raise ValueError("data.tokenizer='sentencepiece' trains a vocabulary beside the data, but "
                       "this corpus has no writable local cache folder; pass a .model file.")
    path = os.path.join(cache_dir, f"spm_bpe_v{vocab_size}.model")
    if not os.path.isfile(path):
      if texts is None:
        raise ValueError("Training a SentencePiece vocabulary needs the corpus texts.")
      train_sentencepiece(texts, vocab_size, path)
    return SentencePieceTokenizer(path)
  if spec.endswith(".model"):
    return SentencePieceTokenizer(os.path.expanduser(spec))
  raise ValueError(f"Unknown tokenizer {spec!r}; allowed: 'byte', 'sentencepiece', or a path to "
                   "a SentencePiece .model file.")


def check_identity(saved: dict, tokenizer) -> None:
  """Raises ValueError if a checkpoint's tokenizer (`{"identity", "vocab_size"}`) differs."""
  if saved.get("identity") != tokenizer.identity or saved.get("vocab_size") != tokenizer.vocab_size:
    raise ValueError(
        f"The checkpoint was written with tokenizer {saved.get('identity')!r} (vocabulary "
        f"{saved.get('vocab_size')}), but this run uses {tokenizer.identity!r} (vocabulary "
        f"{tokenizer.vocab_size}); the model's embeddings would not match. Use the same "
        "data.tokenizer / data.vocab_size as the checkpointed run, or a new workdir.")


def describe(tokenizer) -> dict:
  """What a checkpoint stores to check the tokenizer on restore."""
  return {"identity": tokenizer.identity, "vocab_size": int(tokenizer.vocab_size)}
