"""How far to trust a damage prediction: measure predicted and random flips, calibrate, and screen.

**Measured damage** of one flip: the mean NLL per scored token on the run's evaluation windows after the flip
minus before (nats/token), from a prefix-cached trial (:func:`esa.perturb.protocols.common.trial`); a
non-finite loss counts as +inf (a collapse is the worst outcome). Predictions are made on calibration windows
disjoint from those windows (refused otherwise: a prediction checked on its own data proves nothing).

**Predicted order** (:func:`screening_key`): every ``nonfinite`` flip first (certain collapse), then ``large``
by r, then ``taylor`` by the second-order ΔNLL — the regimes' own rankings, never one polynomial across them.

**Calibration** (:func:`calibration`), per regime and over all: Spearman and Kendall between predicted and
measured (scipy), and recall@n of the n truly worst flips among the n predicted worst.

**Screening** (:func:`screen`): measure in predicted order and stop once no unmeasured candidate can still
beat the measured n-th worst, under the bound :data:`BOUND_KIND` states: a ``taylor`` flip's damage is at most
R·max(p, 0) + b — b from a random calibration sample (absolute errors of small predictions), R learned on the
flips measured so far (relative errors where predictions are large). ``large`` and ``nonfinite`` flips have no
bound and come first in the order; once the n worst measured all collapse, nothing can be worse.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

from esa.core.errors import EsaError
from esa.perturb.bits import flip_bit, layout
from esa.perturb.ops import make_op
from esa.perturb.targets import TargetSet
from esa.predict.taylor import REGIMES, Curvature, predict

RANK = {"nonfinite": 2, "large": 1, "taylor": 0}


def check_disjoint(bench) -> None:
    """Refuse calibration windows that are also evaluation windows."""
    if set(bench.info["calibration_indices"]) & set(bench.info["window_indices"]):
        raise EsaError("the calibration windows overlap the evaluation windows (the corpus has too few windows "
                       "for both); lower --max-eval-tokens or use a larger corpus, so predictions are checked "
                       "on data they were not made from")


def flip_rows(model, curv: Curvature, picks: pd.DataFrame, tau: float) -> pd.DataFrame:
    """``picks`` (param, flat, bit) with value, Δw, predictions, r and regime (exact float64 path)."""
    out = []
    for (name, bit), part in picks.groupby(["param", "bit"], sort=False):
        flat = torch.tensor(part["flat"].to_numpy(), dtype=torch.long)
        param = model.get_parameter(name).detach()
        flat = flat.to(param.device)
        values = param.reshape(-1)[flat]
        delta = flip_bit(values, int(bit)).double() - values.double()
        pred = predict(curv, name, flat, delta, tau)
        out.append(part.assign(value=values.double().cpu().numpy(), delta=delta.cpu().numpy(),
                               first=pred.first.cpu().numpy(), second=pred.second.cpu().numpy(),
                               ratio=pred.ratio.cpu().numpy(),
                               regime=np.array(REGIMES, dtype=object)[pred.regime.long().cpu().numpy()]))
    return pd.concat(out).sort_index() if out else picks


def random_flips(model, curv: Curvature, n: int, seed: int) -> pd.DataFrame:
    """``n`` uniformly random (weight, bit) flips over all predictable tensors (tensor drawn ∝ its size)."""
    names = list(curv.grad)
    sizes = np.array([model.get_parameter(p).numel() for p in names], dtype=float)
    rng = np.random.default_rng(seed)
    which = rng.choice(len(names), size=n, p=sizes / sizes.sum())
    rows = [(names[i], int(rng.integers(sizes[i])), int(rng.integers(layout(model.get_parameter(names[i]).dtype)
                                                                        .width))) for i in which]
    return pd.DataFrame(rows, columns=["param", "flat", "bit"]).drop_duplicates(ignore_index=True)


def verification_pool(model, curv: Curvature, top: dict, n_top: int, n_random: int, tau: float, seed: int
                      ) -> pd.DataFrame:
    """Flips to measure: the map's ``n_top`` worst taylor and large flips and ``n_top // 4`` nonfinite ones
    (``top``: :attr:`esa.predict.vmap.VulnerabilityMap.top`), plus ``n_random`` uniformly random flips — the
    unbiased part that calibration and the screening bound rest on. ``source`` says which is which."""
    picks = [top[r].head(n).assign(source=f"top_{r}")[["param", "flat", "bit", "source"]]
             for r, n in (("taylor", n_top), ("large", n_top), ("nonfinite", n_top // 4))]
    rand = random_flips(model, curv, n_random, seed).assign(source="random")
    pool = pd.concat([*picks, rand]).drop_duplicates(["param", "flat", "bit"], ignore_index=True)
    return flip_rows(model, curv, pool, tau)


def screening_key(df: pd.DataFrame) -> np.ndarray:
    """Sort key, larger = predicted worse: regime first, then r (large) or the second-order ΔNLL (taylor)."""
    within = np.where(df["regime"] == "taylor", df["second"], np.where(df["regime"] == "large", df["ratio"], 0.0))
    order = np.lexsort((within, df["regime"].map(RANK).to_numpy()))
    key = np.empty(len(df))
    key[order] = np.arange(len(df))
    return key


def measure(bench, rows: pd.DataFrame) -> np.ndarray:
    """Measured damage (nats/token, +inf for a non-finite loss) of each flip, one prefix-cached trial each."""
    from esa.perturb.protocols.common import trial

    base = bench.cache.baseline.nll
    tokens = float(bench.n_tokens.sum())
    out = []
    for name, flat, bit in zip(rows["param"], rows["flat"], rows["bit"]):
        nll = trial(bench, TargetSet({name: torch.tensor([int(flat)])}), make_op("bit_flip", bit=int(bit)), 0).nll
        total = float(np.sum(nll) - np.sum(base))
        out.append(total / tokens if np.isfinite(total) else np.inf)
    return np.array(out)


def _rank_safe(x: np.ndarray) -> np.ndarray:
    """+inf (a collapse) replaced by a value above every finite one: the same ranks, finite arithmetic."""
    finite = np.isfinite(x)
    return np.where(finite, x, (x[finite].max() if finite.any() else 0.0) + 1.0)


def _corr(pred: np.ndarray, meas: np.ndarray) -> dict:
    """Spearman and Kendall (rank statistics: collapses rank worst, tied among themselves)."""
    pred, meas = _rank_safe(pred), _rank_safe(meas)
    if len(pred) < 3 or np.ptp(pred) == 0 or np.ptp(meas) == 0:
        return {"n": len(pred), "spearman": None, "kendall": None}
    return {"n": len(pred), "spearman": float(sps.spearmanr(pred, meas).statistic),
            "kendall": float(sps.kendalltau(pred, meas).statistic)}


def recall_at(key: np.ndarray, measured: np.ndarray, n: int) -> float:
    """Share of the n measured-worst flips (ties at the n-th included) among the n predicted worst."""
    n = min(n, len(measured))
    if n == 0:
        return float("nan")
    worst = np.flatnonzero(measured >= np.sort(measured)[::-1][n - 1])
    predicted = set(np.argsort(-key, kind="stable")[: max(n, len(worst))].tolist())
    return float(np.mean([i in predicted for i in worst]))


def calibration(rows: pd.DataFrame, n: int = 10) -> dict:
    """Spearman/Kendall per regime (``taylor``: second-order prediction; ``large``: r) and over all (the
    screening key), with recall@n; ``rows`` needs regime, second, ratio and measured."""
    meas = rows["measured"].to_numpy(dtype=float)
    out = {"n_flips": len(rows), "recall_at": n, "recall": recall_at(screening_key(rows), meas, n),
           "overall": _corr(screening_key(rows), meas)}
    for regime, col in (("taylor", "second"), ("large", "ratio")):
        part = rows[rows["regime"] == regime]
        out[regime] = {**_corr(part[col].to_numpy(dtype=float), part["measured"].to_numpy(dtype=float)),
                       "n_collapsed": int((~np.isfinite(part["measured"].to_numpy(dtype=float))).sum())}
    part = rows[rows["regime"] == "nonfinite"]
    out["nonfinite"] = {"n": len(part), "n_collapsed": int((~np.isfinite(part["measured"].to_numpy(float))).sum())}
    return out


def error_floor(sample: pd.DataFrame, margin: float = 2.0) -> float:
    """The absolute part of the bound: ``margin`` × the worst under-prediction (measured − predicted,
    nats/token) of the ``taylor`` flips of a random calibration sample; +inf when it has none."""
    part = sample[(sample["regime"] == "taylor") & np.isfinite(sample["measured"])]
    if part.empty:
        return float("inf")
    return margin * max(0.0, float((part["measured"] - part["second"]).max()))


def ratio_bound(measured: pd.DataFrame, floor: float, margin: float = 1.5) -> float:
    """The relative part: ``margin`` × the largest measured/predicted ratio among the ``taylor`` flips measured
    so far whose prediction is well above the floor (≥ 10 × floor), at least 1 — learned where it matters."""
    part = measured[(measured["regime"] == "taylor") & (measured["second"] >= 10 * floor) & (measured["second"] > 0)]
    ratios = (part["measured"] / part["second"]).to_numpy(dtype=float)
    ratios = ratios[np.isfinite(ratios)]
    return margin * max(1.0, float(ratios.max()) if len(ratios) else 1.0)


BOUND_KIND = ("taylor flips: measured ≤ R·max(predicted, 0) + b, R = 1.5 × the largest measured/predicted ratio "
              "seen so far on flips predicted ≥ 10·b, b = 2 × the worst under-prediction on random flips; "
              "large and nonfinite flips have no bound and are measured first")


def screen(rows: pd.DataFrame, measure_fn, n: int, floor: float) -> dict:
    """Measure ``rows`` in predicted order until no unmeasured one can beat the measured n-th worst.

    ``measure_fn(rows) -> damages``. The stop (``BOUND_KIND``): the n worst measured are all collapses
    (nothing can be worse), or the next flip is ``taylor`` and R·p + b is below the n-th worst — every later
    flip then predicts at most p. Returns the measured rows in order, how many, and the stop reason."""
    ranked = rows.iloc[np.argsort(-screening_key(rows), kind="stable")].reset_index(drop=True)
    done: list[float] = []

    def result(i: int, stop: str) -> dict:
        return {"measured": ranked.iloc[:i].assign(measured=done), "n_measured": i, "stop": stop,
                "bound_kind": BOUND_KIND}

    for i in range(len(ranked)):
        if len(done) >= n:
            nth = np.sort(done)[::-1][n - 1]
            if nth == np.inf:
                return result(i, f"the {n} worst measured flips collapse the model: none left can be worse")
            nxt = ranked.iloc[i]
            bound = ratio_bound(ranked.iloc[:i].assign(measured=done), floor)
            if nxt["regime"] == "taylor" and bound * max(nxt["second"], 0.0) + floor < nth:
                return result(i, f"next prediction {nxt['second']:.3g}: R·p + b = {bound:.3g}·p + {floor:.3g} "
                                 f"< measured #{n} {nth:.3g} nats/token")
        done.append(float(measure_fn(ranked.iloc[[i]])[0]))
    return result(len(ranked), "every candidate measured")


def screen_pool(pool: pd.DataFrame, n_calib: int, n: int = 10) -> dict:
    """Screening replayed on an exhaustively measured pool (``measured`` known for every row): the floor b from
    its first ``n_calib`` random flips (their trials count), then :func:`screen` over the rest. Returns the
    trials it needed, their ratio to exhaustive measurement, and ``missed``: how many of the pool's n worst
    damage values (ties are interchangeable) the n worst flips it found fall short of."""
    calib = pool[pool["source"] == "random"].head(n_calib)
    floor = error_floor(calib)
    out = screen(pool.drop(calib.index), lambda r: r["measured"].to_numpy(), n, floor)
    found = np.concatenate([out["measured"]["measured"].to_numpy(float), calib["measured"].to_numpy(float)])
    truth = np.sort(pool["measured"].to_numpy(float))[::-1][:n]
    best = np.sort(found)[::-1][:n]
    trials = out["n_measured"] + len(calib)
    return {"pool": len(pool), "trials": trials, "fewer_than_exhaustive": len(pool) / max(trials, 1),
            "missed_of_worst": int(np.sum(best < truth)) if len(best) == len(truth) else len(truth),
            "n": n, "floor": floor, "stop": out["stop"], "bound_kind": out["bound_kind"],
            "calibration_trials": len(calib)}
