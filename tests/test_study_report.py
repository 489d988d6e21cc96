"""The v2 study report (lsgd_jax.study_report) on a synthetic results.csv whose answers are known
by construction: exact power laws, a hand-computed noise and gap interval, tuned settings."""

import math
import os
import subprocess
import sys

import pytest

from lsgd_jax import report, study_report, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"s": 1_000, "m": 8_000, "l": 64_000}
REL_GAP = {"s": 0.05, "m": 0.03, "l": 0.01}


def _law_n(n):  # DDP's L(N) at 20 tokens/param: alpha 0.1
  return (1e10 / n) ** 0.1


def _row(size, alg, lr, loss, *, seed=0, budget=20, outer=("", "", ""), transferred="",
         k=8, h=10, extended=0):
  n = SIZES[size]
  return {"grid": "main", "model_size": size, "algorithm": alg, "num_workers": k,
          "sync_every": h if alg == "local_sgd" else 1, "outer_optimizer": outer[0],
          "outer_lr": outer[1], "outer_momentum": outer[2], "lr": lr, "seed": seed,
          "steps": 100, "global_batch": 8, "seq_len": 64, "non_embedding_params": n,
          "tokens": budget * n, "tokens_per_param": budget, "flops": 6.0 * n * budget * n,
          "eval_loss": loss, "final_train_loss": loss, "train_seconds": 1.0, "wall_seconds": 2.0,
          "tokens_per_sec": 1.0, "comm_bytes": 1.0, "transferred": transferred,
          "lr_extended": extended, "status": "done", "workdir": f"{size}-{alg}-{lr}-{seed}"}


def _results(tmp_path):
  nest, avg = ("nesterov", 0.7, 0.9), ("average", 1.0, 0.0)
  rows = []
  for size, n in SIZES.items():
    ddp = _law_n(n)
    lsgd = ddp * (1 + REL_GAP[size])
    # DDP tries lr 1e-3, 2e-3, 4e-3 (best 2e-3, interior); local SGD the same with Nesterov
    # (best 2e-3) and averaging (0.5 worse everywhere); 8e-3 an automatic extension.
    for lr, extra in ((1e-3, 0.1), (2e-3, 0.0), (4e-3, 0.2)):
      rows.append(_row(size, "ddp", lr, ddp + extra))
      rows.append(_row(size, "local_sgd", lr, lsgd + extra, outer=nest))
      rows.append(_row(size, "local_sgd", lr, lsgd + extra + 0.5, outer=avg))
    rows.append(_row(size, "ddp", 8e-3, ddp + 0.3, extended=1))
  for seed, dev in ((1, -0.01), (2, +0.01)):  # seeds at "s": deviations -0.01, 0, +0.01 of the
    # tuned settings, so each group's mean is its seed-0 loss and s = 0.01 by hand
    rows.append(_row("s", "ddp", 2e-3, _law_n(1000) + dev, seed=seed, transferred="lr"))
    rows.append(_row("s", "local_sgd", 2e-3, _law_n(1000) * 1.05 + dev, seed=seed,
                     outer=nest, transferred="lr+outer"))
  for budget in (5, 80):  # L(D) at "m": loss = (1e8 / D)^0.2 for DDP, 2% above for local SGD
    d = budget * SIZES["m"]
    for lr, extra in ((1e-3, 0.1), (2e-3, 0.0), (4e-3, 0.2)):
      rows.append(_row("m", "ddp", lr, (1e8 / d) ** 0.2 + extra, budget=budget))
      rows.append(_row("m", "local_sgd", lr, 1.02 * (1e8 / d) ** 0.2 + extra, budget=budget,
                       outer=nest))
  for k, extra in ((1, -0.02), (4, 0.01)):  # K ablation at "l"
    rows.append(_row("l", "local_sgd", 2e-3, _law_n(64_000) * 1.01 + extra, k=k, outer=nest,
                     transferred="lr+outer"))
  path = str(tmp_path / "results.csv")
  sweep.write_csv(rows, path)
  return path


def test_study_report_recovers_known_answers(tmp_path):
  path = _results(tmp_path)
  st = study_report.analyze(report.read_results(path), n_boot=200)
  assert st.main_budget == 20
  cell = st.cells[("m", 20, "local_sgd")]
  assert cell.lr == 2e-3 and cell.outer == "nesterov 0.7/0.9" and cell.interior
  ddp_s = st.cells[("s", 20, "ddp")]
  assert ddp_s.lrs == [1e-3, 2e-3, 4e-3, 8e-3] and ddp_s.extended and len(ddp_s.seeds) == 3
  assert st.noise_df == 4 and st.noise_sd == pytest.approx(0.01, rel=1e-3)
  gap_s = next(g for g in st.gaps if g["size"] == "s" and g["tokens_per_param"] == 20)
  assert gap_s["rel"] == pytest.approx(0.05, rel=1e-3)
  assert gap_s["half"] == pytest.approx(2.776 * 0.01 * math.sqrt(2 / 3), rel=1e-3)
  assert gap_s["unbiased_gap"] == pytest.approx(0.05 * _law_n(1000), rel=1e-3)
  assert [round(g["rel"], 4) for g in st.gaps if g["tokens_per_param"] == 20] == [0.05, 0.03, 0.01]
  assert st.laws["N"]["ddp"]["alpha"] == pytest.approx(0.1, abs=1e-4)
  lo, hi = st.laws["N"]["ddp"]["alpha_lo"], st.laws["N"]["ddp"]["alpha_hi"]
  assert lo < 0.1 < hi
  assert st.laws["N_diff"][0] > 0  # the gap shrinks with N: local SGD's exponent is larger
  # the relative gap falls 2 points per factor 8 in N: slope -0.02 / log10(8) per decade
  assert st.gap_slope["slope"] == pytest.approx(-0.02 / math.log10(8), rel=1e-3)
  assert st.gap_slope["hi"] < 0
  assert st.laws["D"][("m", "ddp")]["alpha"] == pytest.approx(0.2, abs=1e-4)
  assert st.laws["D"][("m", "local_sgd")]["alpha"] == pytest.approx(0.2, abs=1e-4)
  assert {(r["size"], r["outer"]) for r in st.outer_grid} == {
      (s, o) for s in SIZES for o in ("nesterov 0.7/0.9", "average")}
  assert [(r["num_workers"], round(r["minus_ddp"], 4)) for r in st.workers] == [
      (1, round(0.01 * _law_n(64_000) - 0.02, 4)), (4, round(0.01 * _law_n(64_000) + 0.01, 4)),
      (8, round(0.01 * _law_n(64_000), 4))]
  paths = study_report.write(st, str(tmp_path / "out"))
  assert all(os.path.getsize(p) > 0 for p in paths)
  text = open(tmp_path / "out" / "report.md").read()
  assert "| s | 1,000 | 20 | DDP | 0.002 | 0.001, 0.002, 0.004, 0.008 | yes | yes |" in text
  rel_half = 100 * gap_s["half"] / _law_n(1000)  # the relative gap at "s", in percent
  assert f"| +5.00 +- {rel_half:.2f} |" in text and rel_half == pytest.approx(0.45, abs=0.01)


def test_study_report_needs_the_study_columns(tmp_path):
  path = _results(tmp_path)
  cols = report.read_results(path)
  del cols["transferred"]
  with pytest.raises(ValueError, match="transferred"):
    study_report.analyze(cols)


def test_fit_binary_regenerates_the_study_report_exactly(tmp_path):
  """`experiments.fit --study=v2` twice on the same CSV: the same report, byte for byte."""
  path = _results(tmp_path)
  texts = []
  for out in ("a", "b"):
    proc = subprocess.run([sys.executable, "-m", "experiments.fit", f"--results={path}",
                           f"--out={tmp_path / out}", "--study=v2", "--n_boot=50"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    texts.append(open(tmp_path / out / "report.md").read())
  assert texts[0] == texts[1] and texts[0].count("| local SGD |") > 3


def test_transfer_rule_picks_the_outer_setting_of_smallest_mean_gap(tmp_path):
  """Parts 2-3 of the study take from part 1: the outer setting (Nesterov here: averaging is
  0.5 worse by construction) and 3 lrs around each method's tuned lr at the centre size."""
  cols = report.read_results(_results(tmp_path))
  rule = study_report.transfer_rule(cols, ("s", "m"), ["nesterov:0.70:0.9", "average"],
                                    {"l": "m"})
  assert rule["outer"] == "nesterov:0.70:0.9"  # the grid's own spelling, matched by value
  assert rule["gaps"]["average"] == pytest.approx(rule["gaps"]["nesterov:0.70:0.9"] + 0.5)
  assert rule["lrs"] == {"l": ([1e-3, 2e-3, 4e-3], [1e-3, 2e-3, 4e-3])}
  with pytest.raises(ValueError, match="no finished seed-0"):
    study_report.transfer_rule(cols, ("s", "nope"), ["average"], {})


def test_paper_gap_follows_the_papers_laws():
  """arXiv 2409.13198's laws cross near N = 9.2e7 and put local SGD 2.9% behind at 6.7K."""
  assert abs(study_report.paper_gap(9.2e7)) < 1e-3
  # by hand: 0.072 ln(3.15e14 / 6736) - 0.069 ln(6.06e14 / 6736) = 1.76893 - 1.74037 = 0.02856
  assert study_report.paper_gap(6736) == pytest.approx(math.expm1(0.02856), abs=2e-5)
  assert 0.028 < study_report.paper_gap(6736) < 0.030
