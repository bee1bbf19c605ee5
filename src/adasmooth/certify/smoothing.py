"""Randomized smoothing (Cohen, Rosenfeld and Kolter 2019): PREDICT and CERTIFY for any base classifier.

The smoothed classifier returns the class the base classifier f most likely outputs under Gaussian
noise: g(x) = argmax_c P(f(x + eps) = c), eps ~ N(0, sigma^2 I). Noise is added in [0, 1] pixel space,
before the model's own normalisation (adasmooth models normalise inside), and is not clipped.

``Smooth(base_classifier, num_classes, sigma)`` follows Cohen et al.'s interface:

- ``certify(x, n0, n, alpha, batch_size) -> (prediction, radius)``: n0 draws pick the candidate
  class, n fresh draws give a one-sided Clopper-Pearson lower bound pA on its probability (failure
  probability alpha); abstain (-1, 0.0) when pA < 1/2, else radius sigma * Phi^-1(pA) in l_2.
- ``predict(x, n, alpha, batch_size) -> prediction``: the top class when a two-sided binomial test of
  the top two counts rejects equality at level alpha, else -1 (abstain).

``certify_dataset`` runs CERTIFY over a data set, writing Cohen's TSV layout
(``idx label predict radius correct time``) line by line so an interrupted run keeps its rows.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from scipy.stats import binomtest
from torch import nn

from ..core.errors import InputError
from ..core.runtime import example_generator
from ..core.io import write_text
from .bounds import clopper_pearson_lower, cohen_radius

__all__ = ["ABSTAIN", "Smooth", "certify_dataset", "certified_accuracy", "TSV_COLUMNS", "TsvLog", "iter_examples", "selected_examples"]

ABSTAIN = -1
# Noise draws per seeded block (see Smooth._fill_indexed_noise): small enough that a block of large
# images fits any device, large enough that per-block generator set-up costs nothing next to a forward pass.
NOISE_BLOCK = 100


def block_seed(seed: int, index: int) -> int:
    """The seed of input ``index``'s noise blocks (block k then seeds ``example_generator(this, k)``)."""
    return (int(seed) * 1_000_003 + int(index)) % (2**63 - 1)
TSV_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")


class Smooth:
    """A Gaussian smoothed classifier around ``base_classifier`` (a module returning (N, C) scores).

    ``seed`` makes the noise reproducible. A call given the input's ``index`` in its data set draws
    from generators seeded from (seed, index, block of 100 draws), so an input's certificate depends
    neither on which inputs were certified before it (sharding over processes, resuming) nor on the
    batch size; without an index, calls draw in turn from one stateful generator per device.
    ``seed=None`` uses torch's global generator (and ignores the index).
    """

    def __init__(self, base_classifier: nn.Module, num_classes: int, sigma: float, seed: int | None = None):
        if not isinstance(num_classes, int) or num_classes < 2:
            raise InputError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if not (isinstance(sigma, (int, float)) and sigma > 0 and math.isfinite(sigma)):
            raise InputError(f"sigma must be a positive number, got {sigma!r}")
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.sigma = float(sigma)
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    # ------------------------------------------------------------------ sampling

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(int(self.seed))
            self._generators[key] = gen
        return self._generators[key]

    @staticmethod
    def _check_single(x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"expected ONE input of shape (C, H, W), got {shape}")

    @staticmethod
    def _check_draws(num: int, batch_size: int, name: str = "n") -> None:
        if not isinstance(num, int) or num < 1:
            raise InputError(f"{name} must be a positive integer, got {num!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")

    def sample_predictions(self, x: torch.Tensor, num: int, batch_size: int,
                           index: int | None = None) -> torch.Tensor:
        """The base classifier's class on ``num`` noisy copies of x, in draw order: (num,) int64 on x's device."""
        self._check_single(x)
        self._check_draws(num, batch_size, "num")
        seeded_blocks = index is not None and self.seed is not None
        gen = None if seeded_blocks else self._generator(x.device)
        predictions = torch.empty(num, dtype=torch.long, device=x.device)
        # One noise buffer, drawn on x's device and overwritten in place batch after batch: the same
        # values as (x + sigma * randn) without allocating and filling three tensors per batch.
        buffer = torch.empty((min(batch_size, num), *x.shape), device=x.device, dtype=x.dtype)
        with torch.inference_mode():
            for start in range(0, num, batch_size):
                size = min(batch_size, num - start)
                noisy = buffer[:size]
                if seeded_blocks:
                    self._fill_indexed_noise(noisy, index, start)
                else:
                    torch.randn(noisy.shape, generator=gen, device=x.device, dtype=x.dtype, out=noisy)
                noisy.mul_(self.sigma).add_(x)
                scores = self.base_classifier(noisy)
                if scores.dim() != 2 or scores.shape[1] != self.num_classes:
                    raise InputError(
                        f"base classifier returned shape {tuple(scores.shape)}; expected (N, {self.num_classes})"
                    )
                torch.argmax(scores, 1, out=predictions[start : start + size])
        return predictions

    def _fill_indexed_noise(self, out: torch.Tensor, index: int, first: int) -> None:
        """Standard normal draws ``first, first + 1, ...`` of input ``index`` into ``out``.

        Draws come in blocks of ``NOISE_BLOCK``, block k from a generator seeded from (seed, index, k),
        so draw j has one value whatever the batch size that asks for it (a block a batch cuts is drawn
        whole and sliced)."""
        shape = tuple(out.shape[1:])
        filled = 0
        while filled < out.shape[0]:
            block, offset = divmod(first + filled, NOISE_BLOCK)
            take = min(NOISE_BLOCK - offset, out.shape[0] - filled)
            gen = example_generator(block_seed(self.seed, index), block, out.device)
            target = out[filled:filled + take]
            if offset == 0 and take == NOISE_BLOCK:
                torch.randn(target.shape, generator=gen, device=out.device, dtype=out.dtype, out=target)
            else:
                whole = torch.randn((NOISE_BLOCK, *shape), generator=gen, device=out.device, dtype=out.dtype)
                target.copy_(whole[offset:offset + take])
            filled += take

    def _bincount(self, predictions: torch.Tensor) -> np.ndarray:
        # scatter_add, not bincount: on a GPU bincount reads the largest value back to the host
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=predictions.device)
        counts.scatter_add_(0, predictions, torch.ones_like(predictions))
        return counts.cpu().numpy()

    def sample_counts(self, x: torch.Tensor, num: int, batch_size: int, index: int | None = None) -> np.ndarray:
        """How often the base classifier outputs each class on ``num`` noisy copies of x: (num_classes,) int64."""
        return self._bincount(self.sample_predictions(x, num, batch_size, index))

    def selection_and_estimation_counts(
        self, x: torch.Tensor, n0: int, n: int, batch_size: int, index: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Counts over n0 selection draws and n independent estimation draws, sampled in one stream
        (the first n0 draws select) so that small n0 batches cost no extra forward passes."""
        self._check_draws(n0, batch_size, "n0")
        self._check_draws(n, batch_size, "n")
        predictions = self.sample_predictions(x, n0 + n, batch_size, index)
        return self._bincount(predictions[:n0]), self._bincount(predictions[n0:])

    # ------------------------------------------------------------------ Cohen et al.'s algorithms

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int,
                index: int | None = None) -> tuple[int, float]:
        """(prediction, l_2 radius); (-1, 0.0) on abstention. Sound with probability >= 1 - alpha."""
        if not 0 < alpha < 1:
            raise InputError(f"alpha (failure probability) must lie in (0, 1), got {alpha}")
        selection, estimation = self.selection_and_estimation_counts(x, n0, n, batch_size, index)
        candidate = int(selection.argmax())
        p_lower = float(clopper_pearson_lower(int(estimation[candidate]), n, alpha))
        if p_lower < 0.5:
            return ABSTAIN, 0.0
        return candidate, float(cohen_radius(torch.tensor(p_lower, dtype=torch.float64), self.sigma))

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int) -> int:
        """The smoothed prediction, or -1 when the top two classes are not told apart at level alpha."""
        self._check_draws(n, batch_size, "n")
        if not 0 < alpha < 1:
            raise InputError(f"alpha must lie in (0, 1), got {alpha}")
        counts = self.sample_counts(x, n, batch_size)
        order = np.argsort(-counts, kind="stable")
        top, second = int(counts[order[0]]), int(counts[order[1]])
        if top + second == 0 or binomtest(top, top + second, p=0.5).pvalue > alpha:
            return ABSTAIN
        return int(order[0])


# ---------------------------------------------------------------------- data-set level


def iter_examples(data: Any) -> Iterable[tuple[torch.Tensor, int]]:
    """(x, label) pairs from a ``Dataset``, an (x, y) pair of tensors, or an iterable of pairs."""
    if hasattr(data, "x") and hasattr(data, "y"):
        data = (data.x, data.y)
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor) and data[0].dim() == 4:
        xs, ys = data
        if xs.shape[0] != len(ys):
            raise InputError(f"{xs.shape[0]} inputs but {len(ys)} labels")
        for i in range(xs.shape[0]):
            yield xs[i], int(ys[i])
        return
    for x, y in data:
        yield x, int(y)


def expected_count(data: Any, skip: int = 1, max_examples: int | None = None) -> int | None:
    """How many inputs ``iter_examples`` will yield after ``skip`` and ``max_examples`` (None if unknown)."""
    if hasattr(data, "x") and hasattr(data, "y"):
        size = len(data.y)
    elif isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor) and data[0].dim() == 4:
        size = data[0].shape[0]
    elif hasattr(data, "__len__"):
        size = len(data)
    else:
        size = None
    total = None if size is None else math.ceil(size / skip)
    if max_examples is not None:
        total = max_examples if total is None else min(total, max_examples)
    return total


def selected_examples(data: Any, skip: int = 1, max_examples: int | None = None,
                      device: str | torch.device | None = None) -> Iterable[tuple[int, torch.Tensor, int]]:
    """(index, x, label) of every ``skip``-th input of ``data`` (see ``iter_examples``), at most
    ``max_examples`` of them, x moved to ``device`` when one is given."""
    if not isinstance(skip, int) or skip < 1:
        raise InputError(f"skip must be a positive integer, got {skip!r}")
    if max_examples is not None and max_examples < 1:
        raise InputError(f"max_examples must be >= 1, got {max_examples}")

    def generate():
        taken = 0
        for idx, (x, label) in enumerate(iter_examples(data)):
            if idx % skip:
                continue
            if max_examples is not None and taken >= max_examples:
                return
            taken += 1
            yield idx, (x.to(device) if device is not None else x), label

    return generate()


class TsvLog:
    """Cohen's TSV layout (``TSV_COLUMNS``), rewritten atomically after every row so that an
    interrupted run keeps the rows so far and never leaves half a line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lines = ["\t".join(TSV_COLUMNS)]
        self._flush()

    def add(self, row: dict[str, Any]) -> None:
        self.extend([row])

    def extend(self, rows: Iterable[dict[str, Any]]) -> None:
        """Add rows with one rewrite of the file."""
        self._lines.extend(
            f"{row['idx']}\t{row['label']}\t{row['predict']}\t{row['radius']:.4f}\t{row['correct']}\t{row['time']:.4f}"
            for row in rows
        )
        self._flush()

    def _flush(self) -> None:
        write_text(self.path, "\n".join(self._lines) + "\n")


def certify_dataset(
    smooth: Smooth,
    data: Any,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int,
    *,
    skip: int = 1,
    max_examples: int | None = None,
    device: str | torch.device | None = None,
    tsv_path: str | Path | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """CERTIFY on every ``skip``-th example (at most ``max_examples``); rows ``{idx, label, predict, radius, correct, time}``.

    ``data`` is a ``Dataset``, an (x, y) pair of tensors or an iterable of (x, label). Rows go to
    ``tsv_path`` (Cohen's layout) as they are computed.
    """
    from ..core.progress import progress_bar

    examples = selected_examples(data, skip, max_examples, device)
    total = expected_count(data, skip, max_examples)
    rows: list[dict[str, Any]] = []
    tsv = TsvLog(tsv_path) if tsv_path is not None else None
    bar = progress_bar(total=total, desc=f"certify sigma={smooth.sigma}", disable=not progress, leave=False)
    try:
        for idx, x, label in examples:
            start = time.perf_counter()
            prediction, radius = smooth.certify(x, n0, n, alpha, batch_size, index=idx)
            elapsed = time.perf_counter() - start
            row = {
                "idx": idx,
                "label": label,
                "predict": prediction,
                "radius": radius,
                "correct": int(prediction == label),
                "time": elapsed,
            }
            rows.append(row)
            if tsv is not None:
                tsv.add(row)
            bar.update(1)
    finally:
        bar.close()
    return rows


def certified_accuracy(
    rows: Sequence[dict[str, Any]],
    radii: Sequence[float],
    radius_key: str = "radius",
    correct_key: str = "correct",
) -> list[float]:
    """Fraction of rows that are correct with a certified radius >= r, for each r (Cohen et al.'s metric).

    Abstentions count as wrong (their ``correct`` is 0). Returns fractions in [0, 1].
    """
    if not rows:
        raise InputError("no certification rows")
    radius = np.array([float(r[radius_key]) for r in rows])
    correct = np.array([bool(r[correct_key]) for r in rows])
    return [float(np.mean(correct & (radius >= r))) for r in radii]
