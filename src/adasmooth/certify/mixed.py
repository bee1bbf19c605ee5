"""Certified robustness of the mixed classifier whose robust model h is a Gaussian smoothed classifier.

The mixture is ``(1 - alpha) * p_g(x) + alpha * p_h(x)`` with p_h,i(x) = P(f(x + noise) = i), the
class frequencies of the smoothed base classifier f. Its certificates (Theorem A.2 and Theorem 3.5
with Lip = sqrt(2/pi)/sigma, Appendix A) depend on h only; g only moves the clean prediction.

Made statistically valid (the paper's figures used raw Monte Carlo frequencies): per input,
n0 draws select y (h's top class); n fresh draws give, by Clopper-Pearson with a Bonferroni
split (``bounds.simultaneous_bounds``), a lower bound on p_y and an upper bound on every other
p_i that hold together with probability >= 1 - alpha_conf. The radius computed from them is then
a valid certificate for the mixture built on the exact smoothed h with that probability, as in
Cohen et al. The clean prediction of the mixture uses the estimated frequencies.

All certificates for any alpha come from the same per-input counts (``SmoothingCounts``), so the
(alpha, sigma) trade-off of Figure 6 costs no extra network queries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..core.errors import InputError
from ..mixing.rules import mix_logits

from .bounds import clopper_pearson_lower, cohen_radius, lipschitz_radius_from_bounds, rs_radius, simultaneous_bounds, smoothing_lipschitz
from .smoothing import ABSTAIN, Smooth, expected_count, iter_examples, selected_examples

__all__ = [
    "STATISTICS_NOTE",
    "SmoothingCounts",
    "add_record",
    "collect_counts",
    "count_input",
    "count_inputs",
    "counts_from_records",
    "selected_indices",
    "cohen_certificates",
    "mixed_certificates",
    "curve",
    "choose_alpha",
    "pareto_frontier",
]

STATISTICS_NOTE = (
    "Mixed-classifier radii use a lower Clopper-Pearson bound on h's top-class probability and an upper "
    "bound on every other class probability, simultaneous at confidence 1 - alpha_conf (Bonferroni: "
    "alpha_conf/2 for the top class, alpha_conf/(2(C-1)) for each other class; the runner-up bound is "
    "also capped by 1 - lower). h's top class is selected on n0 separate draws. Not raw frequencies."
)


@dataclass
class SmoothingCounts:
    """Per-input Monte Carlo counts of a smoothed classifier (and g's logits when a g is given)."""

    sigma: float
    n0: int
    n: int
    idx: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    selection: list[np.ndarray] = field(default_factory=list)  # (C,) counts over n0 draws
    estimation: list[np.ndarray] = field(default_factory=list)  # (C,) counts over n draws
    std_logits: list[np.ndarray] = field(default_factory=list)  # (C,) g(x), empty without g
    seconds: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.idx)

    def arrays(self) -> dict[str, np.ndarray]:
        if not self.idx:
            raise InputError("no inputs were counted")
        out = {
            "idx": np.asarray(self.idx),
            "labels": np.asarray(self.labels),
            "selection": np.stack(self.selection),
            "estimation": np.stack(self.estimation),
        }
        if self.std_logits:
            out["std_logits"] = np.stack(self.std_logits)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "sigma": self.sigma, "n0": self.n0, "n": self.n, "idx": self.idx, "labels": self.labels,
            "selection": [c.tolist() for c in self.selection], "estimation": [c.tolist() for c in self.estimation],
            "std_logits": [v.tolist() for v in self.std_logits], "seconds": self.seconds,
        }


def selected_indices(size: int, skip: int = 1, max_examples: int | None = None) -> list[int]:
    """The data-set indices a run certifies: every ``skip``-th of ``size``, at most ``max_examples``
    (the inputs ``smoothing.selected_examples`` yields)."""
    if not isinstance(skip, int) or skip < 1:
        raise InputError(f"skip must be a positive integer, got {skip!r}")
    if max_examples is not None and max_examples < 1:
        raise InputError(f"max_examples must be >= 1, got {max_examples}")
    return list(range(0, size, skip))[:max_examples]


def count_input(
    smooths: Mapping[float, Smooth],
    x: torch.Tensor,
    index: int,
    label: int,
    n0: int,
    n: int,
    batch_size: int,
    std_model: nn.Module | None = None,
) -> dict[str, Any]:
    """One input's record: selection and estimation counts and seconds for every smoothed model, and
    g's logits when a g is given. The noise is drawn from (each Smooth's seed, ``index``), so a record
    does not depend on which inputs were counted before it, or on which process.

    ``{"index", "label", "sigmas": [{"sigma", "selection", "estimation", "seconds"}, ...], "std_logits"?}``;
    each sigma's seconds include g's one forward pass (the cost of that sigma's mixture on this input).
    """
    record: dict[str, Any] = {"index": int(index), "label": int(label), "sigmas": []}
    std_seconds = 0.0
    if std_model is not None:
        start = time.perf_counter()
        with torch.no_grad():
            logits = std_model(x.unsqueeze(0))[0].double().cpu().numpy()
        std_seconds = time.perf_counter() - start
        for smooth in smooths.values():
            if logits.shape[0] != smooth.num_classes:
                raise InputError(f"g has {logits.shape[0]} classes but h has {smooth.num_classes}")
        record["std_logits"] = logits
    for sigma, smooth in smooths.items():
        start = time.perf_counter()
        selection, estimation = smooth.selection_and_estimation_counts(x, n0, n, batch_size, index=index)
        record["sigmas"].append({"sigma": float(sigma), "selection": selection, "estimation": estimation,
                                 "seconds": time.perf_counter() - start + std_seconds})
    return record


def add_record(counts_by_sigma: Mapping[float, SmoothingCounts], record: Mapping[str, Any]) -> None:
    """Append one ``count_input`` record (fresh, or read back from a journal) to the counts of each sigma."""
    for entry in record["sigmas"]:
        counts = counts_by_sigma[float(entry["sigma"])]
        counts.idx.append(int(record["index"]))
        counts.labels.append(int(record["label"]))
        counts.selection.append(np.asarray(entry["selection"], dtype=np.int64))
        counts.estimation.append(np.asarray(entry["estimation"], dtype=np.int64))
        if record.get("std_logits") is not None:
            counts.std_logits.append(np.asarray(record["std_logits"], dtype=np.float64))
        counts.seconds.append(float(entry["seconds"]))


def counts_from_records(records: Sequence[Mapping[str, Any]], sigmas: Sequence[float], n0: int,
                        n: int) -> dict[float, SmoothingCounts]:
    """SmoothingCounts per sigma (in ``sigmas``' order) holding ``records`` in the order given."""
    out = {float(s): SmoothingCounts(sigma=float(s), n0=n0, n=n) for s in sigmas}
    for record in records:
        add_record(out, record)
    return out


def _examples(data: Any, skip: int, max_examples: int | None, indices: Sequence[int] | None,
              device: str | torch.device | None) -> Iterable[tuple[int, torch.Tensor, int]]:
    if indices is None:
        return selected_examples(data, skip, max_examples, device)
    indices = [int(i) for i in indices]
    if not indices:
        return iter(())
    if hasattr(data, "select"):  # a Dataset: decode only the inputs asked for
        if not 0 <= min(indices) <= max(indices) < len(data):
            raise InputError(f"input indices must lie in [0, {len(data)}), got {min(indices)}..{max(indices)}")
        pairs = iter_examples(data.select(indices))
    else:
        wanted = set(indices)
        found = {i: pair for i, pair in enumerate(iter_examples(data)) if i in wanted}
        if wanted - set(found):
            raise InputError(f"no input at index {min(wanted - set(found))}: the data are shorter")
        pairs = (found[i] for i in indices)
    return ((i, x.to(device) if device is not None else x, label) for i, (x, label) in zip(indices, pairs))


def count_inputs(
    smooths: Mapping[float, Smooth],
    data: Any,
    n0: int,
    n: int,
    batch_size: int,
    *,
    std_model: nn.Module | None = None,
    skip: int = 1,
    max_examples: int | None = None,
    indices: Sequence[int] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_input: Callable[[dict[str, Any], dict[float, SmoothingCounts]], None] | None = None,
    done_before: int = 0,
) -> dict[float, SmoothingCounts]:
    """``count_input`` for every ``skip``-th input (at most ``max_examples``), or for the data-set
    ``indices`` given, in that order; the counts per sigma. ``on_input(record, counts)`` runs after each
    input (to journal the record, or flush partial files). ``done_before``: inputs an earlier run
    finished (the progress bar starts there)."""
    from ..core.progress import progress_bar

    examples = _examples(data, skip, max_examples, indices, device)
    out = {float(s): SmoothingCounts(sigma=float(s), n0=n0, n=n) for s in smooths}
    total = len(indices) if indices is not None else expected_count(data, skip, max_examples)
    names = ",".join(f"{s:g}" for s in out)
    bar = progress_bar(total=None if total is None else total + done_before, initial=done_before,
                       desc=f"smoothing counts sigma={names}", disable=not progress, leave=False)
    try:
        for idx, x, label in examples:
            record = count_input(smooths, x, idx, label, n0, n, batch_size, std_model)
            add_record(out, record)
            bar.update(1)
            if on_input is not None:
                on_input(record, out)
    finally:
        bar.close()
    return out


def collect_counts(
    smooth: Smooth,
    data: Any,
    n0: int,
    n: int,
    batch_size: int,
    *,
    on_example: Callable[[SmoothingCounts], None] | None = None,
    **options: Any,
) -> SmoothingCounts:
    """Selection and estimation counts (and g's logits) of one smoothed model for every ``skip``-th
    input, or for the data-set ``indices`` given: ``count_inputs`` with one sigma, whose keyword
    ``options`` it takes (std_model, skip, max_examples, indices, device, progress).

    ``on_example(counts)`` runs after each input, e.g. to flush partial results to disk.
    """
    sigma = float(smooth.sigma)
    hook = None if on_example is None else (lambda record, counts: on_example(counts[sigma]))
    return count_inputs({sigma: smooth}, data, n0, n, batch_size, on_input=hook, **options)[sigma]


def cohen_certificates(counts: SmoothingCounts, alpha_conf: float, first: int = 0) -> list[dict[str, Any]]:
    """Cohen et al.'s CERTIFY from the counts: rows {idx, label, predict, radius, correct, time}, for
    the inputs from index ``first`` on (a running certification asks for its newest one)."""
    if not first < len(counts):
        raise InputError(f"no counted input at index {first}; {len(counts)} were counted")
    cand = np.stack(counts.selection[first:]).argmax(1)
    n_a = np.stack(counts.estimation[first:])[np.arange(len(cand)), cand]
    p_lower = clopper_pearson_lower(n_a, counts.n, alpha_conf)
    radius = cohen_radius(torch.as_tensor(p_lower, dtype=torch.float64), counts.sigma).numpy()
    predict = np.where(p_lower >= 0.5, cand, ABSTAIN)
    radius = np.where(p_lower >= 0.5, radius, 0.0)
    return [
        {"idx": int(i), "label": int(lab), "predict": int(p), "radius": float(r), "correct": int(p == lab),
         "time": float(t)}
        for i, lab, p, r, t in zip(counts.idx[first:], counts.labels[first:], predict, radius, counts.seconds[first:])
    ]


def mixed_certificates(
    counts: SmoothingCounts,
    alpha: float,
    alpha_conf: float,
    *,
    std_hardmax: bool = False,
    std_scale: float = 1.0,
) -> dict[str, np.ndarray]:
    """Clean prediction and certified l_2 radii of the mixture with weight ``alpha`` on h, per input.

    Returns arrays: ``predict`` (mixed prediction from g and h's estimated frequencies), ``correct``,
    ``h_class`` (y, selected on the n0 draws), ``p_lower``, ``p_other_upper``, ``radius_rs``
    (Theorem A.2), ``radius_lip`` (Theorem 3.5, Lip = sqrt(2/pi)/sigma), ``certified_correct`` (y is
    the label and the radius is positive; the certificate says the mixture predicts y in the ball).
    Without g logits only alpha = 1 (h alone) is allowed.
    """
    if not 0 <= alpha <= 1:
        raise InputError(f"alpha must lie in [0, 1], got {alpha}")
    a = counts.arrays()
    sel, est, labels = a["selection"], a["estimation"], a["labels"]
    num, num_classes = est.shape
    y = sel.argmax(1)
    rows = np.arange(num)
    others = np.ones_like(est, dtype=bool)
    others[rows, y] = False
    other_counts = est[others].reshape(num, num_classes - 1)
    lower, upper = simultaneous_bounds(est[rows, y], other_counts, np.full(num, counts.n), alpha_conf)
    lo_t = torch.as_tensor(lower, dtype=torch.float64)
    hi_t = torch.as_tensor(upper, dtype=torch.float64)
    radius_rs = rs_radius(lo_t, hi_t, counts.sigma, alpha).numpy()
    radius_lip = lipschitz_radius_from_bounds(lo_t, hi_t, smoothing_lipschitz(counts.sigma), alpha).numpy()
    p_h = est / counts.n
    if alpha < 1:
        if "std_logits" not in a:
            raise InputError("the mixture with alpha < 1 needs g's outputs; collect the counts with std_model")
        # h's frequencies enter Eq. 3.4 as logits whose softmax they are (log 0 = -inf is exact there)
        log_p_h = torch.log(torch.as_tensor(p_h, dtype=torch.float64))
        mixed = mix_logits(torch.as_tensor(a["std_logits"], dtype=torch.float64), log_p_h, alpha,
                           std_scale=std_scale, std_hardmax=std_hardmax)
        predict = mixed.argmax(1).numpy()
    else:
        predict = p_h.argmax(1)
    return {
        "idx": a["idx"],
        "labels": labels,
        "predict": predict,
        "correct": predict == labels,
        "h_class": y,
        "p_lower": lower,
        "p_other_upper": upper,
        "radius_rs": radius_rs,
        "radius_lip": radius_lip,
        "certified_correct": (y == labels),
    }


def curve(certs: Mapping[str, np.ndarray], radii: Sequence[float], bound: str = "rs") -> list[float]:
    """Certified accuracy (%) at each radius: h's class is the label and the ``bound`` radius is >= r > 0.

    At r = 0 this counts inputs certified at some positive radius (the right limit of the curve;
    the clean accuracy of the mixture is reported separately, Figure 6's 'empty circles').
    """
    if bound not in ("rs", "lip"):
        raise InputError(f"bound must be 'rs' or 'lip', got {bound!r}")
    radius = certs[f"radius_{bound}"]
    ok = certs["certified_correct"] & (radius > 0)
    return [100.0 * float(np.mean(ok & (radius >= r))) for r in radii]


def clean_accuracy(certs: Mapping[str, np.ndarray]) -> float:
    return 100.0 * float(np.mean(certs["correct"]))


def choose_alpha(
    counts: SmoothingCounts,
    target_accuracy: float,
    alphas: Sequence[float],
    *,
    std_hardmax: bool = False,
    std_scale: float = 1.0,
) -> float | None:
    """The largest alpha in [1/2, 1] from ``alphas`` whose mixture has clean accuracy >= target (%).

    Larger alpha gives larger radii, so this is the most robust mixture at that clean accuracy;
    None when no alpha reaches the target.
    """
    best = None
    for alpha in sorted(alphas):
        if alpha < 0.5:
            continue
        if alpha < 1 and not counts.std_logits:
            continue
        certs = mixed_certificates(counts, alpha, 0.5, std_hardmax=std_hardmax, std_scale=std_scale)
        if clean_accuracy(certs) >= target_accuracy - 1e-9:
            best = alpha
    return best


def pareto_frontier(
    counts_by_sigma: Mapping[float, SmoothingCounts],
    baseline_sigma: float,
    radii: Sequence[float],
    alpha_conf: float,
    alphas: Sequence[float],
    *,
    bound: str = "rs",
    std_hardmax: bool = False,
    std_scale: float = 1.0,
) -> dict[str, Any]:
    """Figure 6: at the clean accuracy of the smoothed h with ``baseline_sigma`` alone, the best
    mixture for every sigma (largest alpha keeping that accuracy), and the pointwise maximum of
    their certified-accuracy curves (the frontier), all in %."""
    if baseline_sigma not in counts_by_sigma:
        raise InputError(f"no counts for the baseline sigma {baseline_sigma}")
    base = mixed_certificates(counts_by_sigma[baseline_sigma], 1.0, alpha_conf)
    target = clean_accuracy(base)
    candidates = []
    for sigma, counts in sorted(counts_by_sigma.items()):
        alpha = choose_alpha(counts, target, alphas, std_hardmax=std_hardmax, std_scale=std_scale)
        if alpha is None:
            continue
        certs = mixed_certificates(counts, alpha, alpha_conf, std_hardmax=std_hardmax, std_scale=std_scale)
        candidates.append({
            "sigma": sigma, "alpha": alpha, "clean_accuracy": clean_accuracy(certs),
            "certified_accuracy": curve(certs, radii, bound),
        })
    frontier = np.max([c["certified_accuracy"] for c in candidates], axis=0).tolist()
    return {
        "bound": bound,
        "target_clean_accuracy": target,
        "baseline": {"sigma": baseline_sigma, "alpha": 1.0, "clean_accuracy": target,
                     "certified_accuracy": curve(base, radii, bound)},
        "candidates": candidates,
        "radii": list(radii),
        "frontier": frontier,
    }
