"""Training the mixing network (paper Sec. 4.4, 5.2, App. C.2, D.1), calibration, and the Table 2/3 report.

- :func:`composite_loss`: Eq. 4.2 per sample, c_CE*CE + c_BCE*BCE + c_prod*CE*BCE.
- :func:`train_mixnet`: the base models stay frozen; every batch holds clean inputs (pseudo-label 0)
  and inputs attacked on the fly against the current mixed model (pseudo-label 1) in setting A
  (gray-box PGD), B (white-box PGD) or C (APGD-CE + targeted APGD-DLR). Attacks are randomised:
  eps per sample = eps * U(0.4, 1.1), a chi-squared number of steps, and a w ~ U(0, w_max) weighted
  BCE(alpha, 1) term in the attacker's loss that pushes alpha down.
- :func:`calibrate_adaptive` / :func:`calibrate_fixed_alpha`: bisection for a target clean accuracy.
- :func:`report_table`: clean and attacked accuracy under settings A-D for a set of models.
"""

from __future__ import annotations

import collections
import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..attacks import PGD
from ..models.checkpoint import checkpoint_paths, load_checkpoint
from ..data import Dataset, load_dataset
from ..mixing import MixedClassifier, mix_logits
from ..mixing.adaptive import (
    AdaptiveMixedClassifier,
    build_adaptive_classifier,
    save_adaptive_classifier,
)
from ..mixing.network import ranged_alpha
from ..core.runtime import resolve_device, seed_everything
from .loop import clean_accuracy

__all__ = [
    "MixnetTrainConfig",
    "composite_loss",
    "attack_loss",
    "random_attack_budget",
    "craft_training_attack",
    "train_mixnet",
    "clean_accuracy",
    "calibrate_adaptive",
    "calibrate_fixed_alpha",
    "report_table",
    "CalibrateConfig",
    "run_calibration",
    "fixed_alpha_classifier",
    "build_from_config",
    "SETTINGS",
]

SETTINGS = ("A", "B", "C")


# ---------------------------------------------------------------------------- the loss


def composite_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    alpha_logit: torch.Tensor,
    pseudo: torch.Tensor,
    c_ce: float = 0.0,
    c_bce: float = 1.5,
    c_prod: float = 0.2,
) -> torch.Tensor:
    """Eq. 4.2 per sample: c_CE * CE(h_alpha(x), y) + c_BCE * BCE(alpha, pseudo) + c_prod * CE * BCE.

    ``alpha_logit`` is the logit of alpha (BCE from logits is exact where alpha saturates);
    ``pseudo`` is 0 for clean inputs (favour g) and 1 for attacked ones (favour h). Returns (N,).
    """
    if logits.dim() != 2 or y.shape != (logits.shape[0],):
        raise ValueError(f"need (N, C) logits and (N,) labels, got {tuple(logits.shape)} and {tuple(y.shape)}")
    if alpha_logit.shape != y.shape or pseudo.shape != y.shape:
        raise ValueError("alpha_logit and pseudo must have shape (N,)")
    ce = F.cross_entropy(logits, y, reduction="none")
    bce = F.binary_cross_entropy_with_logits(alpha_logit, pseudo.to(alpha_logit.dtype), reduction="none")
    return c_ce * ce + c_bce * bce + c_prod * ce * bce


# ---------------------------------------------------------------------------- the config


@dataclass
class MixnetTrainConfig:
    std_checkpoint: str = ""
    rob_checkpoint: str = ""
    dataset: str = "digits"
    data_dir: str | None = None
    taps: list[str] | None = None  # two module names used on both models; None: each model's defaults
    widths: list[int] = field(default_factory=lambda: [256, 512, 1024])
    blocks: list[int] = field(default_factory=lambda: [2, 2, 2])
    std_scale: float = 1.0
    rob_scale: float = 1.0
    train_scale: float = 2.0
    train_shift: float = 0.4
    train_clamp_std: float | None = 0.6
    bn_momentum: float = 0.01
    # the training-time adversary
    setting: Literal["A", "B", "C"] = "B"
    norm: Literal["linf", "l2"] = "linf"
    eps: float = 8 / 255
    eps_low: float = 0.4
    eps_high: float = 1.1
    attack_steps: int = 10  # mean of the chi-squared number of steps
    max_attack_steps: int | None = None  # cap on the drawn steps (default 3 * attack_steps)
    step_factor: float = 5.0  # PGD step = step_factor * eps / steps (reference code)
    adaptive_weight_max: float = 0.4
    # Eq. 4.2 weights, paper Table 6 best
    c_ce: float = 0.0
    c_bce: float = 1.5
    c_prod: float = 0.2
    clean_loss_scale: float = 1.0
    # optimisation
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup_fraction: float = 0.04
    grad_clip: float | None = 10.0
    ema_decay: float | None = None
    bn_recalibration_batches: int = 20  # recent (clean + attacked) batches that re-estimate BN statistics
    amp: bool = True  # only used on CUDA
    epochs: int = 5
    batch_size: int = 128
    n_train: int | None = None
    val_fraction: float = 0.0
    eval_examples: int | None = 500
    eval_pgd_steps: int = 20
    seed: int = 0
    device: str = "auto"
    output: str = "runs/mixnet"
    resume: bool = True
    progress: bool = True

    def validate(self) -> None:
        if not self.std_checkpoint or not self.rob_checkpoint:
            raise ValueError("std_checkpoint and rob_checkpoint are required")
        if self.setting not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}, got {self.setting!r}")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if not 0 < self.eps_low <= self.eps_high:
            raise ValueError("need 0 < eps_low <= eps_high")
        if self.taps is not None and len(self.taps) != 2:
            raise ValueError(f"taps must be two module names, got {self.taps}")
        for name in ("epochs", "batch_size", "attack_steps", "eval_pgd_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (batch-norm statistics)")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.adaptive_weight_max < 1:
            raise ValueError("adaptive_weight_max must be in [0, 1)")
        if min(self.c_ce, self.c_bce, self.c_prod) < 0 or self.c_ce + self.c_bce + self.c_prod == 0:
            raise ValueError("loss weights must be >= 0 and not all zero")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError("ema_decay must be in (0, 1)")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError("warmup_fraction must be in [0, 1)")
        if self.bn_recalibration_batches < 0:
            raise ValueError("bn_recalibration_batches must be >= 0")


# ---------------------------------------------------------------------------- training-time attacks


def _apgd_available() -> bool:
    try:
        from ..attacks import APGD, APGDTargeted  # noqa: F401
        from ..attacks.adaptive import adaptive_alpha_loss  # noqa: F401
    except ImportError:
        return False
    return True


def attack_loss(setting: str, weight: torch.Tensor | float = 0.0, base: str = "ce") -> Callable:
    """The attacker's objective (model, x, y) -> (N,) to maximise, for a mixed model.

    A: the base loss through ``mix(x, detach_alpha=True)`` (no gradient through alpha).
    B/C: (1 - w) * base + w * BCE(alpha_logit, 1); maximising BCE(alpha, 1) = -log(alpha) drives
    alpha down, towards the non-robust g.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    if base not in ("ce", "margin"):
        raise ValueError(f"base loss must be 'ce' or 'margin', got {base!r}")

    def base_loss(logits, y):
        if base == "ce":
            return F.cross_entropy(logits, y, reduction="none")
        z_y = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.scatter(1, y[:, None], -torch.inf)
        return other.max(1).values - z_y

    def loss(model, x, y):
        if setting == "A":
            return base_loss(model.mix(x, detach_alpha=True).logits, y)
        out = model.mix(x)
        w = torch.as_tensor(weight, device=x.device, dtype=out.logits.dtype)
        push_down = F.binary_cross_entropy_with_logits(out.alpha_logit, torch.ones_like(out.alpha_logit),
                                                       reduction="none")
        return (1 - w) * base_loss(out.logits, y) + w * push_down

    return loss


def random_attack_budget(n: int, cfg: MixnetTrainConfig, rng: np.random.Generator, device, dtype=torch.float32):
    """Per-sample eps (eps * U(low, high)), a chi-squared number of steps, per-sample weights w."""
    eps = cfg.eps * rng.uniform(cfg.eps_low, cfg.eps_high, size=n)
    cap = cfg.max_attack_steps or 3 * cfg.attack_steps
    steps = int(min(cap, max(1, round(rng.chisquare(cfg.attack_steps)))))
    w = rng.uniform(0.0, cfg.adaptive_weight_max, size=n)
    return (torch.as_tensor(eps, device=device, dtype=dtype), steps,
            torch.as_tensor(w, device=device, dtype=dtype))


def craft_training_attack(model: AdaptiveMixedClassifier, x: torch.Tensor, y: torch.Tensor,
                          cfg: MixnetTrainConfig, rng: np.random.Generator) -> torch.Tensor:
    """Attacked inputs against the current mixed model (mixing network in eval mode while crafting)."""
    eps, steps, w = random_attack_budget(x.shape[0], cfg, rng, x.device, x.dtype)
    seed = int(rng.integers(2**31))
    was_training = model.training
    model.eval()
    try:
        if cfg.setting in ("A", "B"):
            attack = PGD(model, eps, cfg.norm, steps, step_size=cfg.step_factor * eps / steps,
                         loss=attack_loss(cfg.setting, w), seed=seed)
            return attack(x, y)
        if not _apgd_available():
            raise ValueError("setting C needs adasmooth.attacks.APGD / APGDTargeted and "
                             "adasmooth.attacks.adaptive.adaptive_alpha_loss, which are not available")
        from ..attacks import APGD, APGDTargeted
        from ..attacks.adaptive import adaptive_alpha_loss, alpha_bce_loss

        # Half the batch untargeted APGD-CE, half targeted APGD-DLR (top other class), both with the
        # randomly weighted alpha term; misclassified inputs are attacked too (they still teach alpha).
        half = x.shape[0] // 2
        parts = []
        if half > 0:
            parts.append(APGD(model, eps[:half], cfg.norm, steps, loss=adaptive_alpha_loss(w[:half], "ce"),
                              seed=seed, attack_misclassified=True)(x[:half], y[:half]))
        parts.append(APGDTargeted(model, eps[half:], cfg.norm, steps, n_target_classes=1, seed=seed,
                                  extra_loss=alpha_bce_loss, extra_weight=w[half:],
                                  attack_misclassified=True)(x[half:], y[half:]))
        return torch.cat(parts, 0)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------- training


def _resume_path(output: str | Path) -> Path:
    weights, _ = checkpoint_paths(output)
    return weights.with_name(weights.name.replace(".safetensors", ".resume.pt"))


def _comparable(cfg: MixnetTrainConfig) -> dict:
    d = asdict(cfg)
    for k in ("progress", "resume", "device", "eval_examples", "eval_pgd_steps"):
        d.pop(k)
    return d


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        t = min(step - warmup, total - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * t))

    return f


@torch.no_grad()
def _ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), net.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)
    for e, b in zip(ema.buffers(), net.buffers()):
        e.copy_(b)


@torch.no_grad()
def recalibrate_batchnorm(model: AdaptiveMixedClassifier, batches: Sequence[torch.Tensor]) -> None:
    """Re-estimate every batch-norm statistic of the mixing network as a plain average over ``batches``.

    Running averages with a small momentum (0.01 for the alpha head) lag far behind the weights in
    short runs, and EMA weights never had statistics of their own; either way the evaluation-mode
    alpha would not match what training saw. Batches are run in training mode (batch statistics,
    the gamma clamp) without gradients; the model is left in eval mode.
    """
    if not batches:
        return
    norms = [m for m in model.mixing_net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    try:
        for x in batches:
            g, h, first, second = model.base_outputs(x)
            model.mixing_net(first, second)
    finally:
        for m, mom in zip(norms, momenta):
            m.momentum = mom
        model.eval()


def _assert_frozen(model: AdaptiveMixedClassifier, reference: dict[str, torch.Tensor]) -> None:
    for name, tensor in list(model.std_model.state_dict().items()) + [
        ("rob." + k, v) for k, v in model.rob_model.state_dict().items()
    ]:
        if not torch.equal(tensor, reference[name]):
            raise RuntimeError(f"base model tensor {name} changed during mixing-network training")


def _base_snapshot(model: AdaptiveMixedClassifier) -> dict[str, torch.Tensor]:
    snap = {k: v.detach().clone() for k, v in model.std_model.state_dict().items()}
    snap.update({"rob." + k: v.detach().clone() for k, v in model.rob_model.state_dict().items()})
    return snap


def build_from_config(cfg: MixnetTrainConfig, input_shape: Sequence[int], device) -> AdaptiveMixedClassifier:
    std_model, std_info = load_checkpoint(cfg.std_checkpoint, device)
    rob_model, rob_info = load_checkpoint(cfg.rob_checkpoint, device)
    if std_info["num_classes"] != rob_info["num_classes"]:
        raise ValueError(f"base models disagree on the class count: g has {std_info['num_classes']}, "
                         f"h has {rob_info['num_classes']}")
    model = build_adaptive_classifier(
        std_model, rob_model, input_shape, widths=cfg.widths, blocks=cfg.blocks,
        taps=tuple(cfg.taps) if cfg.taps else None, std_scale=cfg.std_scale, rob_scale=cfg.rob_scale,
        bn_momentum=cfg.bn_momentum, train_scale=cfg.train_scale, train_shift=cfg.train_shift,
        train_clamp_std=cfg.train_clamp_std,
    )
    model.std_checkpoint, model.rob_checkpoint = cfg.std_checkpoint, cfg.rob_checkpoint
    return model.to(device)


def train_mixnet(cfg: MixnetTrainConfig, train_data: Dataset | None = None,
                 eval_data: Dataset | None = None) -> dict[str, Any]:
    """Train the mixing network per ``cfg``; checkpoint every epoch; return the sidecar metadata."""
    cfg.validate()
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    if train_data is None:
        train_data = load_dataset(cfg.dataset, "train", cfg.data_dir, cfg.val_fraction, cfg.seed)
    train_data = train_data.subset(cfg.n_train)
    if eval_data is None:
        eval_data = load_dataset(cfg.dataset, "test", cfg.data_dir)
    eval_data = eval_data.subset(cfg.eval_examples)
    model = build_from_config(cfg, train_data.input_shape, device)
    net = model.mixing_net
    base_snapshot = _base_snapshot(model)
    steps_per_epoch = max(1, len(train_data) // cfg.batch_size)  # full batches only (batch-norm)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, int(cfg.warmup_fraction * total)))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    ema = copy.deepcopy(net) if cfg.ema_decay is not None else None
    start_epoch, history = 0, []
    resume_file = _resume_path(cfg.output)
    if cfg.resume and resume_file.is_file():
        state = torch.load(resume_file, map_location=device, weights_only=True)
        if state.get("config") == _comparable(cfg):
            net.load_state_dict(state["net"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if ema is not None and "ema" in state:
                ema.load_state_dict(state["ema"])
            start_epoch, history = int(state["epoch"]), list(state["history"])
            print(f"resuming {cfg.output} from epoch {start_epoch}")
        else:
            print(f"ignoring {resume_file}: it was made with a different config")
    t0 = time.time()
    recent: collections.deque = collections.deque(maxlen=max(1, cfg.bn_recalibration_batches))
    for epoch in range(start_epoch, cfg.epochs):
        recent.clear()
        # per-epoch seeds make a resumed run draw what an uninterrupted one would have drawn
        rng = np.random.default_rng([cfg.seed, epoch])
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        perm = torch.randperm(len(train_data), generator=gen)
        sums = {"loss": 0.0, "alpha_clean": 0.0, "alpha_adv": 0.0, "acc_clean": 0.0, "acc_adv": 0.0}
        count = 0
        bar = tqdm(range(steps_per_epoch), desc=f"mixnet {cfg.setting} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress, leave=False)
        for step in bar:
            idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x, y = train_data.x[idx].to(device), train_data.y[idx].to(device)
            x_adv = craft_training_attack(model, x, y, cfg, rng)
            n = x.shape[0]
            inputs, labels = torch.cat([x, x_adv]), torch.cat([y, y])
            pseudo = torch.cat([torch.zeros(n, device=device), torch.ones(n, device=device)])
            sample_w = torch.cat([torch.full((n,), cfg.clean_loss_scale, device=device), torch.ones(n, device=device)])
            if cfg.bn_recalibration_batches > 0:
                recent.append(inputs.detach())
            model.train()
            with torch.autocast(device.type, enabled=use_amp):
                out = model.mix(inputs)
                per_sample = composite_loss(out.logits.float(), labels, out.alpha_logit.float(), pseudo,
                                            cfg.c_ce, cfg.c_bce, cfg.c_prod)
                loss = (sample_w * per_sample).sum() / sample_w.sum()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"mixing-network loss became {loss.item()} at epoch {epoch + 1}; lower the lr")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip is not None:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            if ema is not None:
                _ema_update(ema, net, cfg.ema_decay)
            with torch.no_grad():
                correct = (out.logits.argmax(1) == labels).float()
                sums["loss"] += loss.item() * n
                sums["alpha_clean"] += out.alpha[:n].sum().item()
                sums["alpha_adv"] += out.alpha[n:].sum().item()
                sums["acc_clean"] += correct[:n].sum().item()
                sums["acc_adv"] += correct[n:].sum().item()
                count += n
            bar.set_postfix(loss=f"{sums['loss'] / count:.4f}",
                            a_clean=f"{sums['alpha_clean'] / count:.2f}", a_adv=f"{sums['alpha_adv'] / count:.2f}")
        _assert_frozen(model, base_snapshot)
        record = {"epoch": epoch + 1, "steps": steps_per_epoch, **{k: v / count for k, v in sums.items()}}
        history.append(record)
        _save_epoch(model, ema, cfg, history, epoch, opt, sched, resume_file, list(recent))
        if cfg.progress:
            print(f"[mixnet {cfg.setting}] epoch {epoch + 1}/{cfg.epochs} loss {record['loss']:.4f} "
                  f"alpha clean {record['alpha_clean']:.3f} adv {record['alpha_adv']:.3f}")
    _export(model, ema, list(recent))  # the checkpoint's network: EMA weights if any, fresh BN statistics
    model.eval()
    metrics = _quick_eval(model, eval_data, cfg, device)
    meta = {"dataset": cfg.dataset, "setting": cfg.setting,
            "training": {"config": asdict(cfg), "history": history, "seconds": time.time() - t0},
            "metrics": metrics}
    save_adaptive_classifier(model, cfg.output, meta)
    resume_file.unlink(missing_ok=True)
    return meta


def _export(model: AdaptiveMixedClassifier, ema: nn.Module | None, batches: list) -> None:
    """Replace the live network's state by the exported one (EMA weights, recalibrated BN)."""
    if ema is not None:
        model.mixing_net.load_state_dict(ema.state_dict())
    recalibrate_batchnorm(model, batches)


def _save_epoch(model, ema, cfg, history, epoch, opt, sched, resume_file: Path, batches: list) -> None:
    net = model.mixing_net
    live_state = copy.deepcopy(net.state_dict())  # training goes on from the live weights and statistics
    _export(model, ema, batches)
    save_adaptive_classifier(model, cfg.output, {"dataset": cfg.dataset, "setting": cfg.setting,
                                                 "training": {"config": asdict(cfg), "history": history,
                                                              "complete": False}})
    net.load_state_dict(live_state)
    resume_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = resume_file.with_name(resume_file.name + ".tmp")
    state = {"net": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "epoch": epoch + 1, "history": history, "config": _comparable(cfg)}
    if ema is not None:
        state["ema"] = ema.state_dict()
    torch.save(state, tmp)
    tmp.replace(resume_file)


@torch.no_grad()
def _alpha_and_acc(model, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    out = model.mix(x)
    return out.alpha, (out.logits.argmax(1) == y).float()


def _quick_eval(model: AdaptiveMixedClassifier, data: Dataset, cfg: MixnetTrainConfig, device) -> dict:
    """Clean and white-box PGD accuracy (setting B, plain CE) with the mean alpha on each."""
    accs, alphas = {"clean": [], "pgd": []}, {"clean": [], "pgd": []}
    for x, y in data.batches(256):
        x, y = x.to(device), y.to(device)
        a, c = _alpha_and_acc(model, x, y)
        alphas["clean"].append(a)
        accs["clean"].append(c)
        x_adv = PGD(model, cfg.eps, cfg.norm, cfg.eval_pgd_steps, 2.5 * cfg.eps / cfg.eval_pgd_steps,
                    seed=cfg.seed)(x, y)
        a, c = _alpha_and_acc(model, x_adv, y)
        alphas["pgd"].append(a)
        accs["pgd"].append(c)
    s = cfg.eval_pgd_steps
    return {"clean_acc": 100 * torch.cat(accs["clean"]).mean().item(),
            f"pgd{s}_acc": 100 * torch.cat(accs["pgd"]).mean().item(),
            "alpha_clean_mean": torch.cat(alphas["clean"]).mean().item(),
            f"alpha_pgd{s}_mean": torch.cat(alphas["pgd"]).mean().item(),
            "eval_examples": len(data), "eval_eps": cfg.eps, "eval_norm": cfg.norm}


# ---------------------------------------------------------------------------- calibration


@torch.no_grad()
def _cached_outputs(model: AdaptiveMixedClassifier, data: Dataset, batch_size: int = 256):
    """g and h logits and the BN-normalised gamma of every example, computed once."""
    model.eval()
    device = next(model.mixing_net.parameters()).device
    gs, hs, zs, ys = [], [], [], []
    for x, y in data.batches(batch_size):
        g, h, first, second = model.base_outputs(x.to(device))
        zs.append(model.mixing_net.normalized_gamma(model.mixing_net.gamma(first, second)))
        gs.append(g)
        hs.append(h)
        ys.append(y.to(device))
    return torch.cat(gs), torch.cat(hs), torch.cat(zs), torch.cat(ys)


def _bisect_decreasing(acc_of: Callable[[float], float], lo: float, hi: float, target: float,
                       iters: int = 40) -> tuple[float, float, bool]:
    """Largest value in [lo, hi] whose accuracy is >= target, for an accuracy falling with the value.

    Returns (value, accuracy, reached). ``reached`` is False when even ``lo`` falls short (then
    ``lo`` is returned). Accuracy is a step function and only roughly monotone, so the invariant
    acc(lo) >= target > acc(hi) is what bisection keeps.
    """
    acc_lo, acc_hi = acc_of(lo), acc_of(hi)
    if acc_hi >= target:
        return hi, acc_hi, True
    if acc_lo < target:
        return lo, acc_lo, False
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        acc_mid = acc_of(mid)
        if acc_mid >= target:
            lo, acc_lo = mid, acc_mid
        else:
            hi = mid
    return lo, acc_lo, True


def calibrate_adaptive(
    model: AdaptiveMixedClassifier,
    data: Dataset,
    target_acc: float,
    param: Literal["shift", "alpha_min"] = "shift",
    scale: float | None = None,
    alpha_range: tuple[float, float] | None = None,
    range_width: float | None = None,
    shift_bounds: tuple[float, float] = (-20.0, 20.0),
    batch_size: int = 256,
) -> dict[str, Any]:
    """Set the mixing network's eval shift (or alpha_min, with a fixed range width) so that the clean
    accuracy on ``data`` is as close to ``target_acc`` (%) from above as the data allow, keeping alpha
    as large (robust) as possible. Writes the result into the network's buffers; returns a summary.
    """
    net = model.mixing_net
    if not 0 < target_acc <= 100:
        raise ValueError(f"target_acc is a percentage in (0, 100], got {target_acc}")
    if scale is not None or alpha_range is not None:
        net.set_eval_head(scale=scale, alpha_range=alpha_range)
    g, h, z, y = _cached_outputs(model, data, batch_size)
    eval_scale = float(net.eval_scale)

    def acc(shift: float, lo: float, hi: float) -> float:
        alpha, _ = ranged_alpha(z * eval_scale + shift, lo, hi)
        logits = mix_logits(g, h, alpha, model.std_scale, model.rob_scale)
        return 100.0 * (logits.argmax(1) == y).float().mean().item()

    if param == "shift":
        lo_a, hi_a = float(net.alpha_min), float(net.alpha_max)
        value, reached_acc, reached = _bisect_decreasing(lambda s: acc(s, lo_a, hi_a), *shift_bounds, target_acc)
        net.set_eval_head(shift=value)
    elif param == "alpha_min":
        width = range_width if range_width is not None else float(net.alpha_max - net.alpha_min)
        if not 0 < width <= 1:
            raise ValueError(f"range_width must be in (0, 1], got {width}")
        shift = float(net.eval_shift)
        value, reached_acc, reached = _bisect_decreasing(lambda m: acc(shift, m, m + width), 0.0, 1.0 - width,
                                                         target_acc)
        net.set_eval_head(alpha_range=(value, value + width))
    else:
        raise ValueError(f"param must be 'shift' or 'alpha_min', got {param!r}")
    alpha, _ = ranged_alpha(z * eval_scale + float(net.eval_shift), float(net.alpha_min), float(net.alpha_max))
    return {"param": param, "value": value, "clean_acc": reached_acc, "target_acc": target_acc,
            "reached": reached, "eval_head": net.eval_head(), "alpha_mean": alpha.mean().item(),
            "examples": len(data)}


@torch.no_grad()
def calibrate_fixed_alpha(std_model: nn.Module, rob_model: nn.Module, data: Dataset, target_acc: float,
                          std_scale: float = 1.0, rob_scale: float = 1.0, batch_size: int = 256) -> dict[str, Any]:
    """The largest fixed alpha whose mixed classifier keeps a clean accuracy >= ``target_acc`` (%)."""
    std_model.eval()
    rob_model.eval()
    device = next(std_model.parameters()).device
    gs, hs, ys = [], [], []
    for x, y in data.batches(batch_size):
        x = x.to(device)
        gs.append(std_model(x))
        hs.append(rob_model(x))
        ys.append(y.to(device))
    g, h, y = torch.cat(gs), torch.cat(hs), torch.cat(ys)

    def acc(a: float) -> float:
        logits = mix_logits(g, h, torch.tensor(a, dtype=torch.float64), std_scale, rob_scale)
        return 100.0 * (logits.argmax(1) == y).float().mean().item()

    alpha, reached_acc, reached = _bisect_decreasing(acc, 0.0, 1.0, target_acc)
    return {"alpha": alpha, "clean_acc": reached_acc, "target_acc": target_acc, "reached": reached,
            "examples": len(data)}


# ---------------------------------------------------------------------------- Table 2/3 report

# Which attacks of ``adasmooth.evaluation`` fill each column. A base model has no alpha(x): its A
# and B columns are PGD-20, C the reference AutoAttack, and D the APGD-CE + APGD-T pair that
# adaptive AutoAttack is built on (without the alpha term, which has nothing to act on).
_BASE_ATTACKS = {"A": ["pgd"], "B": ["pgd"], "C": ["autoattack"], "D": ["apgd-ce", "apgd-t"]}


def report_table(models: dict[str, nn.Module], data: Dataset, eps: float, norm: str = "linf",
                 settings: Sequence[str] = ("A", "B", "C", "D"), batch_size: int = 250, seed: int = 0,
                 progress: bool = True, attack_options: dict | None = None) -> list[dict[str, Any]]:
    """Table 2/3 rows: per model its clean accuracy and its accuracy (%) under each setting.

    A gray-box PGD-20, B white-box PGD-20, C AutoAttack, D adaptive AutoAttack (the alpha term), as
    defined by ``adasmooth.evaluation.make_attack``; mixed models also report their mean alpha.
    """
    from ..evaluate.robustness import evaluate_robustness

    bad = [s for s in settings if s not in _BASE_ATTACKS]
    if bad:
        raise ValueError(f"unknown setting(s) {bad}; use A, B, C, D")
    rows = []
    for name, model in models.items():
        model.eval()
        mixed = hasattr(model, "mix")
        columns = {s: ([s] if mixed else _BASE_ATTACKS[s]) for s in settings}
        attacks = list(dict.fromkeys(a for names in columns.values() for a in names))
        rep = evaluate_robustness(model, data, attacks=attacks, eps=eps, norm=norm, batch_size=batch_size,
                                  seed=seed, progress=progress, attack_options=attack_options)
        row: dict[str, Any] = {"model": name, "clean": rep.accuracy()}
        for s, names in columns.items():
            ok = [c and all(rep.robust[a][i] is not False for a in names) for i, c in enumerate(rep.clean_correct)]
            row[s] = 100.0 * sum(ok) / max(1, len(ok))
        if mixed:
            device = next(model.parameters()).device
            with torch.no_grad():
                alphas = [model.mix(x.to(device)).alpha.reshape(-1) for x, _ in data.batches(batch_size)]
            row["alpha_mean"] = float(torch.cat(alphas).float().mean())
        row["seconds"] = sum(rep.seconds.values())
        rows.append(row)
    return rows


def fixed_alpha_classifier(std_model: nn.Module, rob_model: nn.Module, alpha: float, std_scale: float = 1.0,
                           rob_scale: float = 1.0) -> MixedClassifier:
    """The fixed-alpha counterpart (Eq. 3.4) with the same base models and logit scales."""
    return MixedClassifier(std_model, rob_model, alpha, std_scale=std_scale, rob_scale=rob_scale).eval()


# ---------------------------------------------------------------------------- calibration run (CLI)


@dataclass
class CalibrateConfig:
    checkpoints: list[str] = field(default_factory=list)  # adaptive classifiers (e.g. one per setting A/B/C)
    target_acc: float | None = None  # clean accuracy (%) to reach on the calibration data
    target_between: float | None = None  # or: h's accuracy + this fraction of the gap to g's
    param: Literal["shift", "alpha_min"] = "shift"
    scale: float | None = None  # eval-time sigmoid scale (default: keep the stored one)
    alpha_range: list[float] | None = None  # eval-time (alpha_min, alpha_max)
    range_width: float | None = None  # with param=alpha_min: alpha_max - alpha_min
    dataset: str | None = None  # default: the one recorded in the checkpoint
    data_dir: str | None = None
    split: Literal["val", "test"] = "val"
    val_fraction: float = 0.1
    calib_offset: int = 0
    calib_examples: int | None = None
    output: str | None = None  # calibrated checkpoint (one input); default <checkpoint>-calibrated
    report: bool = False
    report_settings: list[str] = field(default_factory=lambda: ["A", "B", "C", "D"])
    eval_examples: int = 500
    eval_offset: int = 0
    eps: float | None = None  # default: the training eps
    norm: Literal["linf", "l2"] | None = None
    batch_size: int = 250
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def validate(self) -> None:
        if not self.checkpoints:
            raise ValueError("give at least one adaptive classifier checkpoint")
        if (self.target_acc is None) == (self.target_between is None):
            raise ValueError("give exactly one of target_acc and target_between")
        if self.target_acc is not None and not 0 < self.target_acc <= 100:
            raise ValueError(f"target_acc is a percentage in (0, 100], got {self.target_acc}")
        if self.target_between is not None and not 0 <= self.target_between <= 1:
            raise ValueError(f"target_between must be in [0, 1], got {self.target_between}")
        if self.output and len(self.checkpoints) > 1:
            raise ValueError("output names one calibrated checkpoint; with several inputs leave it unset")
        if self.alpha_range is not None and len(self.alpha_range) != 2:
            raise ValueError("alpha_range must be two numbers: min, max")
        bad = [s for s in self.report_settings if s not in ("A", "B", "C", "D")]
        if bad:
            raise ValueError(f"unknown report settings {bad}; use A, B, C, D")


def _calibration_data(cfg: CalibrateConfig, dataset: str) -> Dataset:
    data = load_dataset(dataset, cfg.split, cfg.data_dir, cfg.val_fraction if cfg.split == "val" else 0.0, cfg.seed)
    end = len(data) if cfg.calib_examples is None else cfg.calib_offset + cfg.calib_examples
    if cfg.calib_offset >= len(data):
        raise ValueError(f"calib_offset {cfg.calib_offset} is past the {len(data)} {cfg.split} examples")
    return Dataset(data.x[cfg.calib_offset:end], data.y[cfg.calib_offset:end], data.num_classes, data.name, data.split)


def run_calibration(cfg: CalibrateConfig) -> dict[str, Any]:
    """Calibrate each adaptive classifier and the fixed-alpha counterpart; optionally the report table."""
    from ..mixing.adaptive import load_adaptive_classifier

    cfg.validate()
    device = resolve_device(cfg.device)
    loaded = [load_adaptive_classifier(p, device=device) for p in cfg.checkpoints]
    first_model, first_info = loaded[0]
    dataset = cfg.dataset or first_info.get("dataset")
    if not dataset:
        raise ValueError("the checkpoint records no dataset; pass dataset")
    calib = _calibration_data(cfg, dataset)
    g, h = first_model.std_model, first_model.rob_model
    acc_g, acc_h = clean_accuracy(g, calib, cfg.batch_size, device), clean_accuracy(h, calib, cfg.batch_size, device)
    target = cfg.target_acc if cfg.target_acc is not None else acc_h + cfg.target_between * (acc_g - acc_h)
    results: dict[str, Any] = {"target_acc": target, "calibration": {"split": cfg.split, "examples": len(calib),
                                                                      "std_clean_acc": acc_g, "rob_clean_acc": acc_h},
                               "adaptive": []}
    out_paths = []
    for path, (model, info) in zip(cfg.checkpoints, loaded):
        summary = calibrate_adaptive(model, calib, target, cfg.param, cfg.scale,
                                     tuple(cfg.alpha_range) if cfg.alpha_range else None, cfg.range_width,
                                     batch_size=cfg.batch_size)
        out = cfg.output or str(checkpoint_paths(path)[0].with_suffix("")) + "-calibrated"
        meta = {k: v for k, v in info.items() if k not in ("provenance", "eval_head", "mixing_net", "taps",
                                                           "std_scale", "rob_scale", "detach_features",
                                                           "format_version", "kind", "num_classes")}
        meta["calibration"] = {**summary, "source": str(path), "split": cfg.split, "dataset": dataset}
        save_adaptive_classifier(model, out, meta)
        out_paths.append(out)
        results["adaptive"].append({"checkpoint": str(path), "calibrated": out, "setting": info.get("setting"),
                                    **summary})
    fixed = calibrate_fixed_alpha(g, h, calib, target, first_model.std_scale, first_model.rob_scale, cfg.batch_size)
    results["fixed"] = fixed
    if cfg.report:
        train_cfg = first_info.get("training", {}).get("config", {})
        eps = cfg.eps if cfg.eps is not None else train_cfg.get("eps")
        norm = cfg.norm or train_cfg.get("norm", "linf")
        if eps is None:
            raise ValueError("no eps given and none recorded in the checkpoint")
        test = load_dataset(dataset, "test", cfg.data_dir)
        test = Dataset(test.x[cfg.eval_offset:cfg.eval_offset + cfg.eval_examples],
                       test.y[cfg.eval_offset:cfg.eval_offset + cfg.eval_examples], test.num_classes, test.name, "test")
        models: dict[str, nn.Module] = {"g (standard)": g, "h (robust)": h}
        for (model, info), entry in zip(loaded, results["adaptive"]):
            label = f"adaptive ({info.get('setting') or '?'})"
            while label in models:
                label += "'"
            models[label] = model
        models[f"fixed alpha={fixed['alpha']:.4f}"] = fixed_alpha_classifier(
            g, h, fixed["alpha"], first_model.std_scale, first_model.rob_scale)
        results["report"] = {"eps": eps, "norm": norm, "examples": len(test),
                             "rows": report_table(models, test, eps, norm, cfg.report_settings, cfg.batch_size,
                                                  cfg.seed, cfg.progress)}
    return results
