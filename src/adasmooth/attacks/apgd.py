"""Auto-PGD (Croce & Hein, ICML 2020) for l_inf and l_2, untargeted and targeted.

APGD is PGD with a step size that adapts per example: it starts at 2 * eps, and at checkpoints
(after 22 % of the iterations, then at shrinking intervals of at least 6 %) it halves the step and
restarts from the best point found whenever the loss rose in fewer than ``rho`` of the steps
since the last checkpoint, or when neither the step nor the best loss changed. Steps use a
momentum of 0.75. Each restart begins at a random point on the surface of the ball.

Conventions shared with :class:`adasmooth.attacks.PGD`:

- ``attack(x, y) -> x_adv`` with x, x_adv in [0, 1]; ``eps`` is a float or an (N,) tensor.
- A loss is ``"ce"``, ``"dlr"``, ``"margin"`` or any :class:`~adasmooth.attacks.losses.AttackLoss`
  to maximise. APGD only spends forward passes on examples it is still attacking when the loss
  allows subsets (``select`` or ``stateless``, see :mod:`adasmooth.attacks.losses`); other
  callables are run on the full batch.
- For each input the result is a misclassified iterate if one was found, otherwise the iterate
  with the highest loss (or, with ``minimum_margin=True``, the point with the smallest probability
  margin, the clean input included).
- By default inputs the model already misclassifies are returned unchanged and cost nothing, as in
  AutoAttack; ``attack_misclassified=True`` attacks them too (useful for training-time attacks).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import InputError
from .base import (Attack, ExampleGenerators, Norm, check_attack_args, check_batch, draw, make_generator, normalized_step, per_sample,
                   project, tensor_like)
from .losses import (
    AttackLoss,
    TargetedLoss,
    can_subset,
    check_logits,
    dlr_from_logits,
    get_loss,
    logit_loss,
    loss_for_rows,
)
from .registry import ATTACKS

__all__ = ["APGD", "APGDTargeted", "probability_margin", "TargetedLoss", "APGD_STEPS", "N_TARGET_CLASSES"]

APGD_STEPS = 100  # the steps of every named APGD attack unless the ``apgd_steps`` option says otherwise
N_TARGET_CLASSES = 9  # AutoAttack's APGD-T default: the nine classes ranked highest after the label


def probability_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """p_y - max_{j != y} p_j: the top-1 minus runner-up probability gap while correct, < 0 once wrong."""
    probs = F.softmax(logits.float(), dim=1)
    p_y = probs.gather(1, y[:, None]).squeeze(1)
    others = probs.scatter(1, y[:, None], -1.0)
    return (p_y - others.max(1).values).to(logits.dtype)


class _Recorder:
    """Stands in for the model inside a loss callable and keeps the logits it computed on ``x``.

    This spares a second forward pass to learn whether an iterate is misclassified. Logits are
    only reused when the loss evaluated the model on exactly the tensor APGD gave it.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor):
        self._model = model
        self._x = x
        self.logits: torch.Tensor | None = None

    def __call__(self, inp: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self._model(inp, *args, **kwargs)
        if inp is self._x and not args and not kwargs:
            self.logits = out
        return out

    def mix(self, inp: torch.Tensor, detach_alpha: bool = False):
        out = self._model.mix(inp, detach_alpha=detach_alpha)
        if inp is self._x:
            self.logits = out.logits
        return out

    def __getattr__(self, name):
        return getattr(self._model, name)


def _select_weight(weight, index: torch.Tensor):
    if isinstance(weight, torch.Tensor) and weight.dim() > 0:
        return weight[index.to(weight.device)]
    return weight


def _put(dst: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor, src: torch.Tensor, sync_free: bool) -> None:
    """``dst[rows[mask]] = src[mask]`` in place. Sync-free runs never drop rows (``rows`` is every
    row in order), so a ``where`` does it without the host learning how many rows ``mask`` holds."""
    if sync_free:
        dst.copy_(torch.where(mask.view(-1, *([1] * (dst.dim() - 1))), src, dst))
    else:
        dst[rows[mask]] = src[mask]


class APGD(Attack):
    """Untargeted Auto-PGD. ``APGD(model, eps, ...)(x, y) -> x_adv``.

    Arguments beyond the loss: ``steps`` iterations per restart; ``restarts`` random restarts, each
    on the inputs not yet misclassified; ``rho`` the checkpoint threshold; ``momentum`` 0.75 as in
    the paper; ``eot_iter`` gradient samples averaged per step (for randomised models);
    ``minimum_margin`` keeps the smallest-margin point for every input (paper App. D.2);
    ``seed`` makes the random starts reproducible (``None``: torch's global generator).

    The attribute ``sync_free`` (None: on every device but the CPU) runs the iterations without a
    host-device synchronisation: broken inputs stay in the batch (masked) instead of being dropped.
    That changes the cost, and which misclassified iterate is returned (the highest-loss one rather
    than the first), never which inputs are broken. On the CPU, where dropping them saves work and
    a "synchronisation" is free, they are dropped.
    """

    sync_free: bool | None = None

    seeds_per_example = True

    def __init__(
        self,
        model: nn.Module,
        eps: float | torch.Tensor,
        norm: Norm = "linf",
        steps: int = 100,
        restarts: int = 1,
        loss: str | AttackLoss = "ce",
        rho: float = 0.75,
        seed: int | None = 0,
        minimum_margin: bool = False,
        eot_iter: int = 1,
        momentum: float = 0.75,
        attack_misclassified: bool = False,
    ):
        check_attack_args(eps, norm, steps)
        if not isinstance(restarts, int) or restarts < 1:
            raise InputError(f"restarts must be a positive integer, got {restarts!r}")
        if not 0.0 < rho <= 1.0:
            raise InputError(f"rho must lie in (0, 1], got {rho}")
        if not isinstance(eot_iter, int) or eot_iter < 1:
            raise InputError(f"eot_iter must be a positive integer, got {eot_iter!r}")
        if not 0.0 <= momentum < 1.0:
            raise InputError(f"momentum must lie in [0, 1), got {momentum}")
        super().__init__(model, eps, norm, seed)
        self.steps = steps
        self.restarts = restarts
        self.rho = rho
        self.minimum_margin = minimum_margin
        self.eot_iter = eot_iter
        self.momentum = momentum
        self.attack_misclassified = attack_misclassified
        self.loss = loss if callable(loss) else self._check_loss_name(loss)
        # checkpoint schedule (fractions of the paper: 0.22 first interval, -0.03 per check, >= 0.06)
        self._first_interval = max(int(0.22 * steps), 1)
        self._min_interval = max(int(0.06 * steps), 1)
        self._interval_decrease = max(int(0.03 * steps), 1)

    # ------------------------------------------------------------------ losses

    @staticmethod
    def _check_loss_name(loss: str) -> str:
        get_loss(loss)  # raises a clear error for unknown names
        return loss

    def _per_example_loss(self, model, x_adv, y, index):
        """(loss (m,), logits (m, C) or None) for rows ``index`` of the current call's batch."""
        if isinstance(self.loss, str):
            logits = model(x_adv)
            return logit_loss(self.loss, logits, y), logits
        loss = loss_for_rows(self.loss, index)
        rec = _Recorder(model, x_adv)
        return loss(rec, x_adv, y), rec.logits

    def _can_subset(self) -> bool:
        return isinstance(self.loss, str) or can_subset(self.loss)

    # ------------------------------------------------------------------ geometry

    def _random_start(self, x, eps, generator):
        """A random point on the surface of the ball (l_inf: scaled uniform noise), clipped to [0, 1]."""
        if self.norm == "linf":
            t = 2 * draw("uniform", tuple(x.shape), generator, x) - 1
            scale = t.flatten(1).abs().amax(1)
        else:
            t = draw("normal", tuple(x.shape), generator, x)
            scale = t.flatten(1).norm(dim=1)
        t = t / (scale.view(-1, *([1] * (x.dim() - 1))) + 1e-12)
        return (x + eps * t).clamp(0, 1)

    def _project(self, x_new, x, eps):
        return (x + project(x_new - x, eps, self.norm)).clamp(0, 1)

    def _direction(self, grad):
        return normalized_step(grad, self.norm)

    # ------------------------------------------------------------------ one run

    def _value_and_grad(self, x_adv, y, index, need_grad: bool = True):
        """Per-example loss, logits and (unless ``need_grad`` is False) the input gradient, EOT-averaged."""
        grad = None
        loss_sum = None
        logits = None
        for _ in range(self.eot_iter):
            xr = x_adv.detach().requires_grad_(need_grad)
            with torch.set_grad_enabled(need_grad):
                loss, logits = self._per_example_loss(self.model, xr, y, index)
                if loss.shape != (xr.shape[0],):
                    raise InputError(f"attack loss must return shape ({xr.shape[0]},), got {tuple(loss.shape)}")
                if need_grad:
                    (g,) = torch.autograd.grad(loss.sum(), xr)
                    grad = g if grad is None else grad + g
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        if logits is None:  # the loss did not evaluate the model on x_adv itself (e.g. a surrogate)
            with torch.no_grad():
                logits = self.model(x_adv)
        if self.eot_iter > 1:
            loss_sum = loss_sum / self.eot_iter
            grad = grad / self.eot_iter if need_grad else None
        return loss_sum, logits.detach(), grad

    def _run(self, x, y, eps, index, generator, stop_early: bool, sync_free: bool = False):
        """One APGD run from a random start on the rows of x (``index``: their rows in the call's batch).

        Returns (fooled (n,), point (n, ...), best_loss (n,), margin (n,) or None, margin_point or None):
        ``point`` is a misclassified iterate where fooled, else the highest-loss iterate.

        The per-example state is kept compact: with ``stop_early`` the rows of broken inputs are
        removed from every state tensor as soon as they break, so later steps cost nothing for them
        and no step needs to gather or scatter rows. With ``sync_free`` (never together with
        ``stop_early``) no step asks the host anything about tensor values: updates are ``where``s.
        """

        def changed(mask: torch.Tensor) -> bool:  # skips an update that changes nothing, at a sync
            return sync_free or bool(mask.any())

        n = x.shape[0]
        track_margin = self.minimum_margin
        x_adv = self._random_start(x, eps, generator)
        loss, logits, grad = self._value_and_grad(x_adv, y, index)

        # outputs, one row per input of this run
        fooled_out = torch.zeros(n, dtype=torch.bool, device=x.device)
        point = x_adv.clone()
        best_loss_out = loss.clone()
        margin_out = probability_margin(logits, y) if track_margin else None
        margin_point = x_adv.clone() if track_margin else None

        # compact per-example state
        rows = torch.arange(n, device=x.device)
        st = {
            "x": x, "y": y, "eps": eps, "index": index, "rows": rows,
            "x_adv": x_adv, "x_prev": x_adv.clone(), "grad": grad,
            "step": 2.0 * eps.expand(n, *([1] * (x.dim() - 1))).clone(),
            "best_loss": loss.clone(), "x_best": x_adv.clone(), "grad_best": grad.clone(),
            "reduced_last": torch.ones(n, dtype=torch.bool, device=x.device),
            "best_at_last_check": loss.clone(),
            "fooled": logits.argmax(1) != y,
        }
        if track_margin:
            st["min_margin"] = margin_out.clone()
        if sync_free:
            st["wrong_loss"] = torch.where(st["fooled"], loss, torch.full_like(loss, -torch.inf))
        hist = torch.empty(self.steps + 1, n, device=x.device, dtype=loss.dtype)
        hist[0] = loss
        hist_keep = None  # columns of hist still in use (hist is compacted lazily, at checkpoints)

        def drop(keep: torch.Tensor) -> None:
            nonlocal hist_keep
            for key, val in st.items():
                st[key] = val[keep]
            hist_keep = keep.nonzero().squeeze(1) if hist_keep is None else hist_keep[keep]

        fooled_out |= st["fooled"]  # rows are still every row in order
        if stop_early and st["fooled"].any():
            drop(~st["fooled"])
        interval, since_check = self._first_interval, 0
        for i in range(self.steps):
            if st["rows"].numel() == 0:
                break
            a = 1.0 if i == 0 else self.momentum
            xa, xc, ea = st["x_adv"], st["x"], st["eps"]
            z = self._project(xa + st["step"] * self._direction(st["grad"]), xc, ea)
            x_new = self._project(xa + a * (z - xa) + (1 - a) * (xa - st["x_prev"]), xc, ea)
            st["x_prev"] = xa
            st["x_adv"] = x_new
            last = i == self.steps - 1  # the gradient at the final iterate would never be used
            loss, logits, grad = self._value_and_grad(x_new, st["y"], st["index"], need_grad=not last)
            if last:
                grad = st["grad"]
            st["grad"] = grad
            if hist_keep is not None:  # columns were dropped since the last compaction of hist
                hist = hist[:, hist_keep]
                hist_keep = None
            hist[i + 1] = loss

            wrong = logits.argmax(1) != st["y"]
            newly = wrong & ~st["fooled"]
            if track_margin:
                m = probability_margin(logits, st["y"])
                lower = m < st["min_margin"]
                if changed(lower):
                    st["min_margin"] = torch.where(lower, m, st["min_margin"])
                    _put(margin_out, st["rows"], lower, m, sync_free)
                    _put(margin_point, st["rows"], lower, x_new, sync_free)
            better = loss > st["best_loss"]
            if changed(better):
                st["best_loss"] = torch.where(better, loss, st["best_loss"])
                b = better.view(-1, *([1] * (x.dim() - 1)))
                st["x_best"] = torch.where(b, x_new, st["x_best"])
                st["grad_best"] = torch.where(b, grad, st["grad_best"])

            since_check += 1
            if since_check == interval:
                window = hist[i + 1 - interval : i + 2]
                n_increase = (window[1:] > window[:-1]).sum(0)
                oscillating = n_increase <= interval * self.rho
                stalled = ~st["reduced_last"] & (st["best_at_last_check"] >= st["best_loss"])
                reduce = oscillating | stalled
                st["reduced_last"] = reduce
                st["best_at_last_check"] = st["best_loss"].clone()
                if changed(reduce):
                    r = reduce.view(-1, *([1] * (x.dim() - 1)))
                    st["step"] = torch.where(r, st["step"] / 2.0, st["step"])
                    st["x_adv"] = torch.where(r, st["x_best"], st["x_adv"])
                    st["grad"] = torch.where(r, st["grad_best"], st["grad"])
                since_check = 0
                interval = max(interval - self._interval_decrease, self._min_interval)

            if sync_free:
                # Broken inputs stay in the batch, so keep the misclassified iterate with the highest
                # loss (as the reference keeps its latest one) rather than the first: it lies deepest
                # across the boundary, which matters when the model runs at a low precision and an
                # fp32 pass judges the point.
                deeper = wrong & (loss > st["wrong_loss"])
                st["wrong_loss"] = torch.where(deeper, loss, st["wrong_loss"])
                _put(point, st["rows"], deeper, x_new, True)
                fooled_out |= wrong
                st["fooled"] = st["fooled"] | wrong
            elif newly.any():
                r = st["rows"][newly]
                point[r] = x_new[newly]
                fooled_out[r] = True
                best_loss_out[st["rows"]] = st["best_loss"]
                if stop_early:
                    drop(~newly)
                else:
                    st["fooled"] = st["fooled"] | newly

        r = st["rows"]
        if sync_free:
            best_loss_out.copy_(st["best_loss"])
        else:
            best_loss_out[r] = st["best_loss"]
        _put(point, r, ~fooled_out[r], st["x_best"], sync_free)
        return fooled_out, point, best_loss_out, margin_out, margin_point

    # ------------------------------------------------------------------ public

    def _check_inputs(self, x, y):
        check_batch(x, y)

    def _attack(self, x, y, ids=None):
        """Run every (target, restart) of ``self._runs`` and merge: (x_adv, margins or None)."""
        x = x.detach()
        y = y.to(x.device)
        n = x.shape[0]
        all_rows = torch.arange(n, device=x.device)
        eps = per_sample(self.eps, x)
        generator = make_generator(self.seed, x.device, ids)
        with torch.no_grad():
            clean_logits = self.model(x)
        check_logits(clean_logits, y)

        result = x.clone()
        # found: result holds a misclassified point (or the clean input is wrong and is left alone)
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        if not (self.attack_misclassified or self.minimum_margin):
            found |= clean_logits.argmax(1) != y
        best_loss = torch.full((n,), -torch.inf, device=x.device, dtype=x.dtype)
        margin = probability_margin(clean_logits, y) if self.minimum_margin else None
        subset_ok = self._can_subset()
        sync_free = self.sync_free if self.sync_free is not None else x.device.type != "cpu"

        for prepare in self._runs(clean_logits, y):
            todo = all_rows if self.minimum_margin else all_rows[~found]
            if todo.numel() == 0:
                break
            run_rows = todo if subset_ok else all_rows
            prepare()
            stop_early = subset_ok and not self.minimum_margin and not sync_free
            run_gen = generator.rows(run_rows) if isinstance(generator, ExampleGenerators) else generator
            f, pt, bl, mm, mp = self._run(x[run_rows], y[run_rows], eps[run_rows], run_rows, run_gen, stop_early,
                                          sync_free)
            if not subset_ok:  # the run covered every row; keep the rows it was meant for
                f, pt, bl = f[todo], pt[todo], bl[todo]
                if mm is not None:
                    mm, mp = mm[todo], mp[todo]
            if self.minimum_margin:
                lower = mm < margin[todo]
                rows = todo[lower]
                margin[rows] = mm[lower]
                result[rows] = mp[lower]
                continue
            rows = todo[f]
            result[rows] = pt[f]
            found[rows] = True
            higher = ~f & (bl > best_loss[todo])
            rows = todo[higher]
            result[rows] = pt[higher]
            best_loss[rows] = bl[higher]
        return result.detach(), margin

    def _runs(self, clean_logits, y):
        """One ``prepare()`` callback per APGD run; untargeted: one per restart."""
        for _ in range(self.restarts):
            yield lambda: None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(x, y)
        return self._attack(x, y, ids)[0]

    def attack_with_margins(self, x: torch.Tensor, y: torch.Tensor,
                            ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_adv, p_y - max_{j != y} p_j of the model at x_adv) for every input."""
        self._check_inputs(x, y)
        x_adv, _ = self._attack(x, y, ids)
        with torch.no_grad():
            margins = probability_margin(self.model(x_adv), y.to(x.device))
        return x_adv, margins


class APGDTargeted(APGD):
    """Targeted Auto-PGD over the top-k classes other than the label (AutoAttack's APGD-T).

    For each of the k = min(n_target_classes, C - 1) classes ranked highest by the clean logits
    (the label excluded), an APGD run maximises the targeted loss towards that class, on the inputs
    no earlier run has broken. ``loss`` is ``"dlr-targeted"`` (needs C >= 4), ``"ce-targeted"``
    (maximises -CE(logits, target)) or a callable ``(model, x, y, target) -> (N,)``.
    ``extra_loss`` (an untargeted AttackLoss, e.g. the adaptive alpha term) joins as
    ``(1 - extra_weight) * targeted + extra_weight * extra``; ``extra_weight`` is a float or (N,).
    ``target_ranks`` runs only the targets of those ranks (0: the highest other class), e.g. one
    copy of an input per target, as the mixing-network training attacks do.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float | torch.Tensor,
        norm: Norm = "linf",
        steps: int = 100,
        n_target_classes: int = N_TARGET_CLASSES,
        loss: str | TargetedLoss = "dlr-targeted",
        rho: float = 0.75,
        seed: int | None = 0,
        extra_loss: AttackLoss | None = None,
        extra_weight: float | torch.Tensor = 0.0,
        restarts: int = 1,
        minimum_margin: bool = False,
        eot_iter: int = 1,
        momentum: float = 0.75,
        attack_misclassified: bool = False,
        target_ranks: Sequence[int] | None = None,
    ):
        if not callable(loss) and loss not in ("dlr-targeted", "ce-targeted"):
            raise InputError(f"unknown targeted loss {loss!r}; use 'dlr-targeted', 'ce-targeted' or a callable")
        if not isinstance(n_target_classes, int) or n_target_classes < 1:
            raise InputError(f"n_target_classes must be a positive integer, got {n_target_classes!r}")
        w = torch.as_tensor(extra_weight)
        if (w < 0).any() or (w > 1).any():
            raise InputError(f"extra_weight must lie in [0, 1], got {extra_weight}")
        super().__init__(model, eps, norm, steps, restarts, "ce", rho, seed, minimum_margin, eot_iter, momentum,
                         attack_misclassified)
        self.targeted_loss = loss
        self.n_target_classes = n_target_classes
        if target_ranks is not None and any(int(r) < 0 for r in target_ranks):
            raise InputError(f"target_ranks must be >= 0, got {list(target_ranks)}")
        self.target_ranks = None if target_ranks is None else [int(r) for r in target_ranks]
        self.extra_loss = extra_loss
        self.extra_weight = extra_weight
        self._targets: torch.Tensor | None = None  # (N,) target class of the current run, whole batch

    def _can_subset(self) -> bool:
        main_ok = isinstance(self.targeted_loss, str) or can_subset(self.targeted_loss)
        return main_ok and (self.extra_loss is None or can_subset(self.extra_loss))

    def _per_example_loss(self, model, x_adv, y, index):
        target = self._targets[index]
        rec = _Recorder(model, x_adv)
        if isinstance(self.targeted_loss, str):
            logits = rec(x_adv)
            if self.targeted_loss == "dlr-targeted":
                main = dlr_from_logits(logits, y, target)
            else:
                main = -F.cross_entropy(logits, target, reduction="none")
        else:
            main = loss_for_rows(self.targeted_loss, index)(rec, x_adv, y, target)
        if self.extra_loss is not None:
            extra = loss_for_rows(self.extra_loss, index)
            w = tensor_like(_select_weight(self.extra_weight, index), main)
            main = (1 - w) * main + w * extra(rec, x_adv, y)
        return main, rec.logits

    def _runs(self, clean_logits, y):
        n_classes = clean_logits.shape[1]
        if self.targeted_loss == "dlr-targeted" and n_classes < 4:
            raise InputError(
                f"the targeted DLR loss needs at least 4 classes, the model has {n_classes}; use loss='ce-targeted'"
            )
        ranks = range(self.n_target_classes) if self.target_ranks is None else self.target_ranks
        ranks = [t for t in ranks if t < n_classes - 1]
        ranked = clean_logits.detach().clone()
        ranked.scatter_(1, y[:, None], -torch.inf)
        order = ranked.argsort(dim=1, descending=True)
        for t in ranks:
            for _ in range(self.restarts):
                def prepare(t=t):
                    self._targets = order[:, t]
                yield prepare
        self._targets = None


@ATTACKS.register("apgd-ce", description="APGD on cross-entropy (100 steps, 1 restart)", options=("apgd_steps",))
def build_apgd_ce(model, eps, norm, seed, batch_size, apgd_steps: int = APGD_STEPS) -> APGD:
    return APGD(model, eps, norm, steps=apgd_steps, loss="ce", seed=seed)


@ATTACKS.register("apgd-dlr", description="APGD on the DLR loss (100 steps, 1 restart)", options=("apgd_steps",))
def build_apgd_dlr(model, eps, norm, seed, batch_size, apgd_steps: int = APGD_STEPS) -> APGD:
    return APGD(model, eps, norm, steps=apgd_steps, loss="dlr", seed=seed)


@ATTACKS.register("apgd-t", description="targeted APGD-DLR over the top-9 other classes (100 steps each)",
                  options=("apgd_steps", "n_target_classes"))
def build_apgd_t(model, eps, norm, seed, batch_size, apgd_steps: int = APGD_STEPS,
                 n_target_classes: int = N_TARGET_CLASSES) -> APGDTargeted:
    return APGDTargeted(model, eps, norm, steps=apgd_steps, n_target_classes=n_target_classes, seed=seed)
