"""The report of a tuned DDP-vs-local-SGD study (configs/scaling_cpu_v2.py) from its results.csv.

    cols = report.read_results("docs/scaling_cpu_v2/results.csv")
    study = study_report.analyze(cols)
    study_report.write(study, "docs/scaling_cpu_v2")   # report.md and the plots

What it computes, each from the rows of results.csv alone (`experiments/fit.py --study=v2`):

- tuning: for every (size, budget, method), the seed-0 run of lowest eval loss among the runs that
  tried settings themselves (column `transferred` empty), the lrs tried, and whether the best lr
  is interior to them;
- noise: the run-to-run standard deviation s, pooled over every (size, budget, method) with
  several seeds at its tuned settings (degrees of freedom: runs - groups);
- gaps: local SGD minus DDP at each size and budget, absolute and relative to DDP, on the mean
  over the seeds at the tuned settings, with a t interval from s; where seeds 1+ exist also the
  gap of their means alone (free of the seed-0 selection bias);
- laws: L(N) per method at the main budget, L(D) per method and size, all of the form
  L = (X_c / X)^alpha fitted by least squares in log-log, with intervals from a parametric
  bootstrap (each point redrawn with the measured noise s / sqrt(seeds)); the slope of the
  relative gap against log10 N with its interval; the compute frontier per method;
- ablations: outer optimizer x lr at each size that tuned it, workers K, sync interval H.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from typing import Any

import numpy as np

from lsgd_jax import report

_ALGS = ("ddp", "local_sgd")
_LABEL = {"ddp": "DDP", "local_sgd": "local SGD"}


def _t975(df: int) -> float:
  """The 0.975 quantile of Student's t with `df` degrees of freedom (table; normal beyond 30)."""
  table = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
           2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
           2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
  return table[df - 1] if 1 <= df <= 30 else 1.960


def _outer(cols, i) -> str:
  name = str(cols["outer_optimizer"][i])
  if name in ("", "nan"):
    return "-"
  if name == "average":
    return "average"
  return f"{name} {cols['outer_lr'][i]:g}/{cols['outer_momentum'][i]:g}"


@dataclasses.dataclass
class Cell:
  """One method at one size and budget: its tuned settings and losses."""

  size: str
  n: float
  tokens_per_param: int
  alg: str
  best: int                 # row of the tuned seed-0 run
  lr: float                 # its learning rate
  outer: str                # its outer optimizer ("-" for DDP)
  lrs: list[float]          # lrs tried at the tuned outer setting (seed 0)
  extended: bool            # the lr grid was extended automatically
  seeds: list[int]          # rows at the tuned settings, every seed (best included)

  @property
  def interior(self) -> bool:
    return len(self.lrs) >= 3 and self.lrs[0] < self.lr < self.lrs[-1]


@dataclasses.dataclass
class Study:
  cols: dict[str, np.ndarray]
  cells: dict[tuple[str, int, str], Cell]     # (size, tokens/param, alg) -> cell
  noise_sd: float
  noise_df: int
  main_budget: int
  gaps: list[dict]
  laws: dict[str, Any]
  gap_slope: dict | None
  outer_grid: list[dict]
  workers: list[dict]
  sync: list[dict]
  frontier: dict[str, Any]
  notes: list[str]


def _columns(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A copy of the columns with what every selection here needs: `transferred` ("" where empty),
  `budget` (tokens per parameter, rounded) and `outer_spec` (each row's outer optimizer as a
  `sweep.outer` spec, "" for DDP)."""
  cols = dict(cols)
  n = len(cols["eval_loss"])
  cols["transferred"] = np.array([("" if str(v) == "nan" else str(v))
                                  for v in cols["transferred"]])
  cols["budget"] = np.rint(cols["tokens"] / cols["non_embedding_params"]).astype(int)
  cols["outer_spec"] = np.array([_spec(cols, i) for i in range(n)])
  return cols


def _tuning_rows(cols, size: str, budget: int, alg: str, k: float | None = None,
                 h: float | None = None, spec: str | None = None) -> np.ndarray:
  """Rows of the finished seed-0 runs that tried their settings themselves (nothing
  transferred) of one size, budget and method; at K workers / sync interval H / outer `spec`
  where given (H and the spec only for local SGD)."""
  sel = (np.isfinite(cols["eval_loss"]) & (cols["seed"] == 0) & (cols["transferred"] == "")
         & (cols["model_size"] == size) & (cols["budget"] == budget)
         & (cols["algorithm"] == alg))
  if k is not None:
    sel &= cols["num_workers"] == k
  if alg == "local_sgd" and h is not None:
    sel &= cols["sync_every"] == h
  if alg == "local_sgd" and spec is not None:
    sel &= cols["outer_spec"] == _normal(spec)
  return np.flatnonzero(sel)


def _best(cols, rows: np.ndarray) -> int:
  return int(rows[np.argmin(cols["eval_loss"][rows])])


def analyze(cols: dict[str, np.ndarray], main_budget: int | None = None, n_boot: int = 1000,
            seed: int = 0) -> Study:
  """Everything the report shows (see the module docstring). `main_budget` (tokens per
  parameter of the L(N) law; None: the budget run at the most sizes)."""
  report.check_bootstrap(n_boot, seed)
  need = ("model_size", "seed", "lr", "outer_optimizer", "outer_lr", "outer_momentum",
          "transferred", "lr_extended")
  missing = [c for c in need if c not in cols]
  if missing:
    raise ValueError(f"Results lack the study columns {', '.join(missing)} (a results.csv of "
                     "lsgd_jax.sweep has them).")
  cols = _columns(cols)
  ok = np.isfinite(cols["eval_loss"])
  budget = cols["budget"]
  notes = []
  cells: dict[tuple[str, int, str], Cell] = {}
  base_k, base_h = _main_k_h(cols, ok)
  for size, b, alg in dict.fromkeys(zip(cols["model_size"][ok], budget[ok],
                                        cols["algorithm"][ok])):
    rows = _tuning_rows(cols, str(size), int(b), str(alg), base_k, base_h)
    if not rows.size:
      continue
    best = _best(cols, rows)
    same_outer = rows[cols["outer_spec"][rows] == cols["outer_spec"][best]]
    at_tuned = ok & (cols["model_size"] == size) & (budget == b) & (cols["algorithm"] == alg) & (
        cols["num_workers"] == base_k) & (cols["lr"] == cols["lr"][best]) & (
            cols["outer_spec"] == cols["outer_spec"][best])
    if alg == "local_sgd":
      at_tuned &= cols["sync_every"] == base_h
    cells[(str(size), int(b), str(alg))] = Cell(
        str(size), float(cols["non_embedding_params"][best]), int(b), str(alg), best,
        float(cols["lr"][best]), _outer(cols, best),
        sorted(float(v) for v in cols["lr"][same_outer]),
        bool(np.any(cols["lr_extended"][same_outer] > 0)),
        [int(r) for r in np.flatnonzero(at_tuned)])
  if main_budget is None:
    per_budget = collections.Counter(b for (_, b, _) in cells)
    main_budget = per_budget.most_common(1)[0][0] if per_budget else 20
  sd, df = _pooled_noise(cols, cells)
  if df == 0:
    notes.append("no size has several seeds: gaps have no interval.")
  gaps = _gaps(cols, cells, sd, df)
  laws, slope = _laws(cols, cells, gaps, sd, df, main_budget, n_boot, seed, notes)
  return Study(cols, cells, sd, df, main_budget, gaps, laws, slope,
               _outer_grid(cols, cells, main_budget, base_k, base_h),
               _ablation(cols, ok, budget, cells, "num_workers", base_k, base_h),
               _ablation(cols, ok, budget, cells, "sync_every", base_k, base_h),
               _frontier(cols, cells, n_boot, seed), notes)


def _main_k_h(cols, ok) -> tuple[float, float]:
  """The K and H of most local SGD runs: the study's main setting."""
  lsgd = ok & (cols["algorithm"] == "local_sgd")
  if not lsgd.any():
    return 8.0, 1.0
  k = collections.Counter(cols["num_workers"][lsgd]).most_common(1)[0][0]
  h = collections.Counter(cols["sync_every"][lsgd]).most_common(1)[0][0]
  return float(k), float(h)


def _losses(cols, rows) -> np.ndarray:
  return cols["eval_loss"][np.asarray(rows, int)]


def _pooled_noise(cols, cells, size: str | None = None) -> tuple[float, int]:
  """Pooled run-to-run standard deviation over the cells (of `size`, if given) with several
  seeds, and its degrees of freedom."""
  ss, df = 0.0, 0
  for (s, _, _), cell in cells.items():
    if size is not None and s != size:
      continue
    y = _losses(cols, cell.seeds)
    if y.size > 1:
      ss += float(np.sum((y - y.mean()) ** 2))
      df += y.size - 1
  return (math.sqrt(ss / df) if df else math.nan), df


def _noise_of(cols, cells, size: str, fallback: float) -> float:
  """A size's own pooled noise, or `fallback` if it has no seeds."""
  sd, df = _pooled_noise(cols, cells, size)
  return sd if df else fallback


def _gaps(cols, cells, sd, df) -> list[dict]:
  out = []
  for (size, b, alg), cell in sorted(cells.items(), key=lambda kv: (kv[1].n, kv[0][1])):
    if alg != "local_sgd" or (size, b, "ddp") not in cells:
      continue
    ddp = cells[(size, b, "ddp")]
    yl, yd = _losses(cols, cell.seeds), _losses(cols, ddp.seeds)
    gap = float(yl.mean() - yd.mean())
    s_size, df_size = _pooled_noise(cols, cells, size)
    s_used, df_used = (s_size, df_size) if df_size else (sd, df)
    half = (_t975(df_used) * s_used * math.sqrt(1 / yl.size + 1 / yd.size)) if df_used else math.nan
    row = {"size": size, "noise_sd": s_used, "noise_df": df_used, "noise_own": bool(df_size),
           "N": cell.n, "tokens_per_param": b, "ddp": float(yd.mean()),
           "local_sgd": float(yl.mean()), "seeds": (yd.size, yl.size), "gap": gap,
           "half": half, "rel": gap / float(yd.mean()), "rel_half": half / float(yd.mean())}
    if yl.size > 1 and yd.size > 1:  # seeds 1+ alone: no selection bias
      rest_l = _losses(cols, [r for r in cell.seeds if cols["seed"][r] != 0])
      rest_d = _losses(cols, [r for r in ddp.seeds if cols["seed"][r] != 0])
      row["unbiased_gap"] = float(rest_l.mean() - rest_d.mean())
      row["selection_bias"] = {a: float(_losses(cols, [c.best]).mean() - rest.mean())
                               for a, c, rest in (("ddp", ddp, rest_d),
                                                  ("local_sgd", cell, rest_l))}
    out.append(row)
  return out


def fit_log_linear(x, y, sd_log, n_boot: int, rng: np.random.Generator) -> dict:
  """L = (X_c / X)^alpha by least squares of log L on log X; intervals from a parametric
  bootstrap that redraws each log L with standard deviation `sd_log` (array or scalar)."""
  lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
  if np.unique(lx).size < 2:
    raise ValueError("a law needs two distinct x values")

  def fit(v):
    slope, icpt = np.polyfit(lx, v, 1)
    return -slope, icpt / -slope if slope != 0 else math.nan  # alpha, log X_c

  alpha, log_xc = fit(ly)
  sd = np.broadcast_to(np.asarray(sd_log, float), ly.shape)
  boot = np.array([fit(ly + rng.normal(0.0, 1.0, ly.shape) * sd)[0] for _ in range(n_boot)])
  lo, hi = (np.nanpercentile(boot, [2.5, 97.5]) if np.all(np.isfinite(sd)) and sd.any()
            else (math.nan, math.nan))
  return {"alpha": float(alpha), "X_c": float(math.exp(log_xc)), "alpha_lo": float(lo),
          "alpha_hi": float(hi), "boot": boot, "x": np.exp(lx), "y": np.exp(ly)}


def _laws(cols, cells, gaps, sd, df, main_budget, n_boot, seed, notes):
  rng = np.random.default_rng(seed)
  laws: dict[str, Any] = {"N": {}, "D": {}}
  for alg in _ALGS:
    pts = sorted((c.n, _losses(cols, c.seeds).mean(), len(c.seeds), _noise_of(cols, cells, s, sd))
                 for (s, b, a), c in cells.items() if a == alg and b == main_budget)
    if len(pts) >= 2:
      n, y, k, sds = map(np.array, zip(*pts))
      laws["N"][alg] = fit_log_linear(n, y, sds / y / np.sqrt(k), n_boot, rng)
    sizes = {s for (s, b, a) in cells if a == alg}
    for size in sorted(sizes):
      pts = sorted((c.n * b, _losses(cols, c.seeds).mean(), len(c.seeds)) for (s, b, a), c in
                   cells.items() if a == alg and s == size)
      if len(pts) >= 3:
        d, y, k = map(np.array, zip(*pts))
        laws["D"][(size, alg)] = fit_log_linear(d, y, _noise_of(cols, cells, size, sd) / y
                                                / np.sqrt(k), n_boot, rng)
  if len(laws["N"]) == 2:
    a, b = laws["N"]["local_sgd"], laws["N"]["ddp"]
    diff = a["boot"] - b["boot"]
    laws["N_diff"] = (a["alpha"] - b["alpha"], *np.nanpercentile(diff, [2.5, 97.5]))
  main = [g for g in gaps if g["tokens_per_param"] == main_budget]
  slope = None
  if len(main) >= 3 and math.isfinite(sd):
    logn = np.log10([g["N"] for g in main])
    rel = np.array([g["rel"] for g in main])
    se = np.array([g["rel_half"] for g in main]) / _t975(df)  # standard error of each gap
    boot = [np.polyfit(logn, rel + rng.normal(0.0, 1.0, rel.shape) * se, 1)[0]
            for _ in range(n_boot)]
    slope = {"slope": float(np.polyfit(logn, rel, 1)[0]), "lo": float(np.percentile(boot, 2.5)),
             "hi": float(np.percentile(boot, 97.5))}
  else:
    notes.append("no gap-vs-N slope: it needs 3 sizes at the main budget and a noise estimate.")
  return laws, slope


def _outer_grid(cols, cells, main_budget, base_k, base_h) -> list[dict]:
  """At each size that tried several outer settings: each setting's best loss (over lrs)."""
  out = []
  for (size, b, alg), cell in sorted(cells.items(), key=lambda kv: kv[1].n):
    if alg != "local_sgd" or b != main_budget:
      continue
    sel = _tuning_rows(cols, size, b, alg, base_k, base_h)
    by = collections.defaultdict(list)
    for r in sel:
      by[_outer(cols, r)].append(r)
    if len(by) < 2:
      continue
    ddp = cells.get((size, b, "ddp"))
    for name, rows in by.items():
      r = min(rows, key=lambda i: cols["eval_loss"][i])
      lrs = sorted(float(cols["lr"][i]) for i in rows)
      step = float(cols["outer_lr"][r]) / (1.0 - float(cols["outer_momentum"][r]))
      out.append({"size": size, "N": cell.n, "outer": name, "step": step,
                  "loss": float(cols["eval_loss"][r]),
                  "lr": float(cols["lr"][r]), "lrs": lrs,
                  "minus_ddp": (float(cols["eval_loss"][r] - cols["eval_loss"][ddp.best])
                                if ddp else math.nan)})
  return out


def _ablation(cols, ok, budget, cells, column, base_k, base_h) -> list[dict]:
  """Local SGD runs that vary `column` (num_workers or sync_every) away from the main setting,
  with the main-setting run and DDP of the same size and budget beside them."""
  other = "sync_every" if column == "num_workers" else "num_workers"
  base_other = base_h if other == "sync_every" else base_k
  base = base_k if column == "num_workers" else base_h
  sel = (ok & (cols["algorithm"] == "local_sgd") & (cols[column] != base)
         & (cols[other] == base_other))
  out = []
  pairs = {(str(cols["model_size"][i]), int(budget[i])) for i in np.flatnonzero(sel)}
  for size, b in sorted(pairs):
    cell, ddp = cells.get((size, b, "local_sgd")), cells.get((size, b, "ddp"))
    rows = [i for i in np.flatnonzero(sel) if cols["model_size"][i] == size and budget[i] == b
            and cols["seed"][i] == 0]
    if cell is not None:
      rows.append(cell.best)
    for i in sorted(rows, key=lambda i: cols[column][i]):
      out.append({"size": size, "tokens_per_param": b, column: int(cols[column][i]),
                  "loss": float(cols["eval_loss"][i]), "lr": float(cols["lr"][i]),
                  "outer": _outer(cols, i),
                  "minus_ddp": float(cols["eval_loss"][i] - cols["eval_loss"][ddp.best])
                  if ddp else math.nan})
  return out


def _frontier(cols, cells, n_boot, seed) -> dict[str, Any]:
  """Per method: the tuned runs of every size and budget; the lower envelope of loss vs FLOPs."""
  from lsgd_jax import scaling  # pylint: disable=import-outside-toplevel
  out = {}
  for i, alg in enumerate(_ALGS):
    rows = [c.best for (s, b, a), c in cells.items() if a == alg]
    if len(rows) < 3:
      continue
    c, y = cols["flops"][rows], cols["eval_loss"][rows]
    try:
      out[alg] = scaling.compute_frontier(c, y, n_boot=n_boot, seed=seed + i)
    except ValueError:
      continue
  return out


# ----------------------------------------------------------------------------- the report


def _iv(v: float, half: float, digits: int = 3) -> str:
  return f"{v:+.{digits}f} +- {half:.{digits}f}" if math.isfinite(half) else f"{v:+.{digits}f}"


def markdown(st: Study, plots: list[str]) -> str:
  """The report: tables of tuning, gaps, laws and ablations (every number from results.csv)."""
  cols = st.cols
  lines = ["# CPU scaling study v2: report", "",
           "Generated by `python -m experiments.fit --results=results.csv --study=v2 --out=DIR` "
           "from results.csv alone; the findings in README.md quote it.", ""]
  lines += [f"Run-to-run noise: s = {st.noise_sd:.4f} nats pooled over every size with seeds "
            f"({st.noise_df} degrees of freedom); per size (pooled over its two methods), where "
            "it has seeds: " + (", ".join(
                f"{g['size']} ({g['tokens_per_param']} tok/param) {g['noise_sd']:.4f} "
                f"({g['noise_df']} df)" for g in st.gaps if g["noise_own"]) or "none")
            + ". Gap intervals are 95% t intervals from the size's own s, else the pooled one.", ""]
  lines += ["## Tuned settings (seed 0, held-out loss)", "",
            "| size | N | tok/param | method | lr | lrs tried | interior | extended | outer | "
            "eval loss | seeds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for key, c in sorted(st.cells.items(), key=lambda kv: (kv[1].n, kv[0][1], kv[0][2])):
    lines.append(f"| {c.size} | {c.n:,.0f} | {c.tokens_per_param} | {_LABEL[c.alg]} | "
                 f"{c.lr:g} | {', '.join(f'{v:g}' for v in c.lrs)} | "
                 f"{'yes' if c.interior else 'NO'} | {'yes' if c.extended else '-'} | {c.outer} | "
                 f"{cols['eval_loss'][c.best]:.4f} | {len(c.seeds)} |")
  lines += ["", "## Local SGD minus DDP (mean over seeds at the tuned settings)", "",
            "| size | N | tok/param | DDP | local SGD | gap (nats) | gap (% of DDP) "
            "| seeds 1+ only |",
            "|---|---|---|---|---|---|---|---|"]
  for g in st.gaps:
    unb = f"{g['unbiased_gap']:+.3f}" if "unbiased_gap" in g else "-"
    lines.append(f"| {g['size']} | {g['N']:,.0f} | {g['tokens_per_param']} | {g['ddp']:.4f} | "
                 f"{g['local_sgd']:.4f} | {_iv(g['gap'], g['half'])} | "
                 f"{_iv(100 * g['rel'], 100 * g['rel_half'], 2)} | {unb} |")
  bias = [g for g in st.gaps if "selection_bias" in g]
  if bias:
    lines += ["", "Selection bias of seed 0 (seed-0 loss minus the mean of seeds 1+, at the tuned "
              "settings; negative: seed 0 was picked lucky):", ""]
    lines += [f"- {g['size']}: DDP {g['selection_bias']['ddp']:+.4f}, local SGD "
              f"{g['selection_bias']['local_sgd']:+.4f}" for g in bias]
  lines += ["", "## Laws (L = (X_c / X)^alpha, least squares in log-log, 95% parametric "
            "bootstrap)", ""]
  lines += ["| law | method | alpha | 95% interval | X_c | points |", "|---|---|---|---|---|---|"]
  for alg, f in st.laws["N"].items():
    lines.append(f"| L(N) at {st.main_budget} tok/param | {_LABEL[alg]} | {f['alpha']:.4f} | "
                 f"[{f['alpha_lo']:.4f}, {f['alpha_hi']:.4f}] | {f['X_c']:.3g} | {f['x'].size} |")
  for (size, alg), f in sorted(st.laws["D"].items()):
    lines.append(f"| L(D) at {size} | {_LABEL[alg]} | {f['alpha']:.4f} | "
                 f"[{f['alpha_lo']:.4f}, {f['alpha_hi']:.4f}] | {f['X_c']:.3g} | {f['x'].size} |")
  for alg, fr in st.frontier.items():
    if fr.fit is not None:
      lo, hi = fr.fit.intervals["alpha"]
      lines.append(f"| frontier L(C) | {_LABEL[alg]} | {fr.fit.alpha:.4f} | [{lo:.4f}, {hi:.4f}] "
                   f"(point bootstrap) | {fr.fit.params['X_c']:.3g} | {fr.compute.size} |")
  if "N_diff" in st.laws:
    d, lo, hi = st.laws["N_diff"]
    lines += ["", f"alpha(local SGD) - alpha(DDP) in L(N): {d:+.4f} [{lo:+.4f}, {hi:+.4f}] "
              "(paper, arXiv 2409.13198: +0.003)."]
  if st.gap_slope:
    s = st.gap_slope
    lines += [f"Slope of the relative gap per decade of N: {100 * s['slope']:+.2f} points "
              f"[{100 * s['lo']:+.2f}, {100 * s['hi']:+.2f}]."]
  if st.outer_grid:
    lines += ["", "## Outer optimizer (local SGD, best lr per setting, seed 0)", "",
              "The long-run outer step is lr / (1 - momentum) times the pseudo-gradient.", "",
              "| size | outer (lr/momentum) | lr / (1 - momentum) | eval loss | lr | minus DDP |",
              "|---|---|---|---|---|---|"]
    for r in st.outer_grid:
      lines.append(f"| {r['size']} | {r['outer']} | {r['step']:.2g} | {r['loss']:.4f} | "
                   f"{r['lr']:g} | {r['minus_ddp']:+.4f} |")
  for title, rows, key in (("Workers K (global batch fixed)", st.workers, "num_workers"),
                           ("Sync interval H", st.sync, "sync_every")):
    if rows:
      lines += ["", f"## {title}", "", f"| size | tok/param | {key} | eval loss | lr | outer | "
                "minus DDP |", "|---|---|---|---|---|---|---|"]
      lines += [f"| {r['size']} | {r['tokens_per_param']} | {r[key]} | {r['loss']:.4f} | "
                f"{r['lr']:g} | {r['outer']} | {r['minus_ddp']:+.4f} |" for r in rows]
  lines += [""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
  lines += [""] + [f"Note: {n}" for n in st.notes]
  return "\n".join(lines) + "\n"


def paper_gap(n) -> np.ndarray:
  """Local SGD's relative gap to DDP that the paper's laws predict at N (arXiv 2409.13198:
  L = (N_c / N)^alpha, DDP 0.069 / 6.06e14, local SGD 0.072 / 3.15e14)."""
  n = np.asarray(n, float)
  return (3.15e14 / n) ** 0.072 / (6.06e14 / n) ** 0.069 - 1.0


def plot_gaps(st: Study):
  fig = report.new_figure()
  ax = fig.add_subplot()
  for b in sorted({g["tokens_per_param"] for g in st.gaps}):
    g = [x for x in st.gaps if x["tokens_per_param"] == b]
    ax.errorbar([x["N"] for x in g], [100 * x["rel"] for x in g],
                yerr=[100 * x["rel_half"] if math.isfinite(x["rel_half"]) else 0 for x in g],
                fmt="o-", capsize=3, label=f"{b} tokens/param")
  if st.gaps:
    xs = np.geomspace(min(g["N"] for g in st.gaps) / 1.3, max(g["N"] for g in st.gaps) * 1.3, 50)
    ax.plot(xs, 100 * (paper_gap(xs)), "k--", lw=1,
            label="the paper's fitted laws (arXiv 2409.13198)")
  ax.axhline(0, color="k", lw=0.8)
  ax.set(xscale="log", xlabel="non-embedding parameters N",
         ylabel="local SGD - DDP (% of DDP loss)",
         title="Gap of tuned local SGD (K = 8) to tuned DDP (95% intervals)")
  ax.legend(fontsize=8)
  ax.grid(True, which="both", alpha=0.3)
  return fig


def plot_laws(st: Study):
  fig = report.new_figure(figsize=(11, 4.6))
  ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
  for alg, f in st.laws["N"].items():
    col = "C0" if alg == "ddp" else "C1"
    xs = np.geomspace(f["x"].min() / 1.3, f["x"].max() * 1.3, 100)
    ax1.plot(f["x"], f["y"], "o", color=col)
    ax1.plot(xs, (f["X_c"] / xs) ** f["alpha"], color=col,
             label=(f"{_LABEL[alg]}: alpha {f['alpha']:.3f} "
                    f"[{f['alpha_lo']:.3f}, {f['alpha_hi']:.3f}]"))
  ax1.set(xscale="log", yscale="log", xlabel="N", ylabel="eval loss",
          title=f"L(N) at {st.main_budget} tokens/param")
  for (size, alg), f in sorted(st.laws["D"].items()):
    col = "C0" if alg == "ddp" else "C1"
    ls = "-" if size == min(s for s, _ in st.laws["D"]) else "--"
    xs = np.geomspace(f["x"].min() / 1.3, f["x"].max() * 1.3, 100)
    ax2.plot(f["x"], f["y"], "o", color=col)
    ax2.plot(xs, (f["X_c"] / xs) ** f["alpha"], ls, color=col,
             label=f"{_LABEL[alg]} {size}: alpha {f['alpha']:.3f}")
  ax2.set(xscale="log", yscale="log", xlabel="training tokens D", ylabel="eval loss",
          title="L(D)")
  for ax in (ax1, ax2):
    report._log_y_labels(ax)  # pylint: disable=protected-access
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
  return fig


def plot_ablations(st: Study):
  panels = [p for p in (("outer", st.outer_grid), ("num_workers", st.workers),
                        ("sync_every", st.sync)) if p[1]]
  if not panels:
    return None
  fig = report.new_figure(figsize=(5 * len(panels), 4.4))
  for j, (key, rows) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), j + 1)
    if key == "outer":
      names = list(dict.fromkeys(r["outer"] for r in rows))
      for size in dict.fromkeys(r["size"] for r in rows):
        ax.plot(range(len(names)), [next((r["minus_ddp"] for r in rows if r["size"] == size
                                          and r["outer"] == n), np.nan) for n in names],
                "o-", label=size)
      ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
      ax.set(ylabel="local SGD - DDP (nats)", title="Outer optimizer (best lr each)")
    else:
      xs = [r[key] for r in rows]
      ax.plot(xs, [r["minus_ddp"] for r in rows], "o-")
      ax.set(xscale="log", xlabel=key, ylabel="local SGD - DDP (nats)",
             title=f"{key} ({rows[0]['size']}, {rows[0]['tokens_per_param']} tok/param)")
      ax.set_xticks(xs, [str(v) for v in xs])
      ax.minorticks_off()
    ax.axhline(0, color="k", lw=0.8)
    ax.grid(True, alpha=0.3)
    if key == "outer":
      ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def write(st: Study, out_dir: str) -> list[str]:
  """report.md and its plots in out_dir; returns the paths."""
  os.makedirs(out_dir, exist_ok=True)
  plots = []
  for name, fn in (("gap_vs_params.png", plot_gaps), ("laws.png", plot_laws),
                   ("ablations.png", plot_ablations)):
    fig = fn(st)
    if fig is not None:
      fig.savefig(os.path.join(out_dir, name), dpi=110, bbox_inches="tight")
      plots.append(name)
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write(markdown(st, plots))
  return [os.path.join(out_dir, p) for p in plots] + [path]


def transfer_rule(cols: dict[str, np.ndarray], small: tuple[str, ...], outer_grid: list[str],
                  centres: dict[str, str], budget: int = 20) -> dict[str, Any]:
  """The settings parts 2 and 3 of configs/scaling_cpu_v2.py take from part 1, by the rule its
  design states: the outer setting (a `sweep.outer` spec of `outer_grid`) with the lowest mean
  gap to tuned DDP over the `small` sizes; for each size in `centres` (size -> the size whose
  tuned lrs centre its grid), 3 lrs a factor 2 apart around each method's tuned lr there (local
  SGD at the chosen outer setting). Returns {"outer": spec, "gaps": {spec: mean gap},
  "lrs": {size: (DDP lrs, local SGD lrs)}}."""
  cols = _columns(cols)

  def best(size, alg, spec=None):
    rows = _tuning_rows(cols, size, budget, alg, spec=spec)
    if not rows.size:
      raise ValueError(f"no finished seed-0 {alg} run of {size} at {budget} tokens/param"
                       + (f" with outer {spec}" if spec else ""))
    return _best(cols, rows)

  gaps = {spec: float(np.mean([cols["eval_loss"][best(s, "local_sgd", spec)]
                               - cols["eval_loss"][best(s, "ddp")] for s in small]))
          for spec in outer_grid}
  outer = min(gaps, key=gaps.get)
  lrs = {}
  for size, centre in centres.items():
    grid = lambda lr: [float(f"{lr / 2:.3g}"), float(lr), float(f"{lr * 2:.3g}")]
    lrs[size] = (grid(cols["lr"][best(centre, "ddp")]),
                 grid(cols["lr"][best(centre, "local_sgd", outer)]))
  return {"outer": outer, "gaps": gaps, "lrs": lrs}


def _normal(spec: str) -> str:
  """A `sweep.outer` spec with its numbers written as `_spec` writes them ("1.0" -> "1")."""
  name, *nums = spec.split(":")
  return ":".join([name] + [f"{float(v):g}" for v in nums])


def _spec(cols, i) -> str:
  """A row's outer optimizer as a `sweep.outer` spec: "average" or "NAME:LR:MOMENTUM" ("" for
  DDP)."""
  name = str(cols["outer_optimizer"][i])
  if name in ("", "nan"):
    return ""
  if name == "average":
    return "average"
  return f"{name}:{cols['outer_lr'][i]:g}:{cols['outer_momentum'][i]:g}"
