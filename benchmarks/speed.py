"""Speed of attacks and certification against the reference tools and the forward/backward floors.

In one run, on one trained robust model and one set of test images:

1. floors: a forward pass and a forward + input-gradient pass of the model on the attacked batch;
2. own APGD-CE and APGD-T (9 targets, 100 steps) against pyautoattack's (time, robust accuracy,
   every adversarial point judged by the same fp32 forward pass); ours in fp32 (CPU) or tf32, bf16,
   bf16 + channels-last, and that compiled (GPU); the reference runs in fp32 under torch's default
   settings (on CUDA these let cuDNN run convolutions in TF32);
3. certification sampling (``Smooth.sample_predictions``) in samples/s against the plain batched
   forward floor (same batch, same precision, inference mode);
4. per-iteration cost of APGD-CE over the floor ``steps x (forward + backward) + 2 forwards``, every
   input attacked for every step (sync-free, nothing dropped), for fp32 / tf32 / bf16 / bf16 compiled.

The model: CPU, a small CNN (width 16) PGD-trained on Fashion-MNIST (cached in
benchmarks/results/cache); GPU, a PreAct ResNet-18 PGD-trained for a few minutes in bf16 on
Fashion-MNIST padded and repeated to 3x32x32 (CIFAR-shaped, CIFAR-10 channel statistics).

    PYTHONPATH=src python benchmarks/speed.py --device cpu --threads 1
    PYTHONPATH=src python benchmarks/speed.py --device cuda

Targets (issue 14): CPU certify >= 0.95x the forward floor, CPU attacks <= 1.05x the floor; GPU:
bf16 own APGD-CE + APGD-T >= 2.5x faster than pyautoattack's fp32 with robust accuracy within 0.3
points, certify >= 0.95x the bf16 forward floor.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adasmooth.attacks import APGD, APGDTargeted  # noqa: E402
from adasmooth.certify.smoothing import Smooth  # noqa: E402
from adasmooth.core.io import format_table, write_result  # noqa: E402
from adasmooth.core.precision import numerics, prepare_model  # noqa: E402
from adasmooth.data.base import Dataset, load_dataset  # noqa: E402
from adasmooth.models.checkpoint import checkpoint_paths, load_checkpoint  # noqa: E402
from adasmooth.train.loop import TrainConfig, train_base  # noqa: E402

from common import CACHE, RESULTS, data_dir  # noqa: E402  (the shared benchmark folders and data)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 1, warmup: int = 0):
    """(last output, fastest wall time over ``repeats``) after ``warmup`` untimed calls."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return out, best


def cifar_shaped(data: Dataset) -> Dataset:
    x = F.pad(data.x, (2, 2, 2, 2)).repeat(1, 3, 1, 1)
    return Dataset(x=x, y=data.y, num_classes=data.num_classes, name="fashion-mnist-3x32", split=data.split)


def trained_model(device: torch.device, epochs: int):
    """(model, test data, description) of the robust model the benchmark attacks."""
    test = load_dataset("fashion-mnist", "test", data_dir())
    if device.type == "cpu":
        path = CACHE / "speed-fmnist-pgd"
        if not checkpoint_paths(path)[0].is_file():
            train_base(TrainConfig(dataset="fashion-mnist", data_dir=str(data_dir()), arch="small-cnn",
                                   model_kwargs={"width": 16}, method="pgd", eps=0.1, attack_steps=3, epochs=2,
                                   n_train=12000, lr=0.05, eval_examples=500, output=str(path), device="cpu",
                                   progress=False))
        model, info = load_checkpoint(path, device)
        return model.eval(), test, f"small-cnn (width 16), PGD-trained on Fashion-MNIST; {info['metrics']}"
    train = cifar_shaped(load_dataset("fashion-mnist", "train", data_dir()))
    test = cifar_shaped(test)
    path = CACHE / "speed-preact18-gpu"
    t0 = time.perf_counter()
    meta = train_base(TrainConfig(dataset="cifar10", arch="preact-resnet18", method="pgd", eps=0.1, attack_steps=2,
                                  epochs=epochs, batch_size=256, lr=0.1, precision="bf16", eval_examples=500,
                                  output=str(path), device=str(device), progress=False, resume=False),
                      train, test)
    model, _ = load_checkpoint(path, device)
    return model.eval(), test, (f"preact-resnet18, PGD-2 training in bf16 for {epochs} epochs "
                                f"({time.perf_counter() - t0:.0f} s) on CIFAR-shaped Fashion-MNIST; {meta['metrics']}")


def form(model, precision: str, channels_last: bool = False, compiled: bool = False):
    """The model as a run would use it; channels-last works on a copy so the other forms keep theirs."""
    if channels_last:
        model = copy.deepcopy(model)
    return prepare_model(model, precision, channels_last, compiled)


def floors(model, x, device, repeats, steps: int = 0):
    """(forward s, forward + input-gradient s, floor s) of ``model`` on ``x``; the floor is one timed
    block of ``steps`` forward + input-gradient passes and 2 forward passes (APGD's least work)."""
    def forward():
        with torch.no_grad():
            return model(x)

    def forward_backward():
        xr = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(xr), torch.zeros(len(x), dtype=torch.long, device=device), reduction="none")
        return torch.autograd.grad(loss.sum(), xr)

    def floor():
        for _ in range(steps):
            forward_backward()
        forward()
        return forward()

    _, t_f = timed(forward, device, max(3, repeats), warmup=1)
    _, t_fb = timed(forward_backward, device, max(3, repeats), warmup=1)
    _, t_floor = timed(floor, device, repeats) if steps else (None, None)
    return t_f, t_fb, t_floor


def robust_accuracy(model, x_adv, y) -> float:
    with torch.no_grad(), numerics("fp32"):
        return 100.0 * float((model(x_adv).argmax(1) == y).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=None, help="test images attacked (default 500 CPU, 1000 GPU)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="timing repeats (the fastest counts)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--epochs", type=int, default=1, help="GPU model training epochs")
    p.add_argument("--iter-n", type=int, default=None, help="inputs of the per-iteration test (default: --n)")
    p.add_argument("--certify-batch", type=int, default=None, help="noisy copies per pass (default 1000 CPU, 2000 GPU)")
    p.add_argument("--certify-draws", type=int, default=None, help="noisy copies in all (default 10 batches)")
    p.add_argument("--no-reference", action="store_true", help="skip pyautoattack")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    p.add_argument("--only-per-iteration", action="store_true", help="skip the reference comparison and certify")
    p.add_argument("--out", default=str(RESULTS / "speed"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    n = args.n or (1000 if gpu else 500)
    where = torch.cuda.get_device_name(device) if gpu else f"CPU ({platform.processor() or platform.machine()}), " \
                                                              f"{args.threads} thread(s)"
    print(f"device: {where}; torch {torch.__version__}; TF32 defaults: matmul {torch.backends.cuda.matmul.allow_tf32}, "
          f"cudnn {torch.backends.cudnn.allow_tf32}", flush=True)

    model, test, described = trained_model(device, args.epochs)
    model.requires_grad_(False)  # nothing here trains it: no run (ours or the reference's) needs weight gradients
    print(f"model: {described}", flush=True)
    x, y = test.x[:n].to(device), test.y[:n].to(device)
    with torch.no_grad(), numerics("fp32"):
        correct = model(x).argmax(1) == y
    xc, yc = x[correct], y[correct]
    clean = 100.0 * float(correct.float().mean())
    results: dict = {"device": where, "model": described, "n": n, "eps": args.eps, "steps": args.steps,
                     "clean_accuracy": clean, "torch": torch.__version__}
    out = Path(args.out)

    def save():
        write_result(out / f"results-{device.type}.json", results, config=vars(args), seed=args.seed)

    attack_results: dict = {}
    ref = None
    if not args.only_per_iteration:
        # ------------------------------------------------------------------ 2. own APGD vs pyautoattack
        # On a GPU our fp32-storage run uses TF32, as the reference does under torch's defaults (cuDNN
        # convolutions in TF32); true fp32 appears in the per-iteration table.
        forms = {"tf32" if gpu else "fp32": ("tf32" if gpu else "fp32", False, False)}
        if gpu:
            forms.update({"bf16": ("bf16", False, False), "bf16+cl": ("bf16", True, False)})
            if not args.no_compile:
                forms["bf16+cl+compile"] = ("bf16", True, True)
        rows = []

        def with_clean(adv_correct):
            full = x.clone()
            full[correct] = adv_correct.detach()
            return full

        for precision, channels_last, _ in forms.values():  # warm up (cuDNN algorithm choice, lazy start-up)
            floors(form(model, precision, channels_last), x, device, 1)
        runs = {}
        if not args.no_reference:
            from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

            def ref_ce():
                atk = APGDAttack(model, n_iter=args.steps, norm="Linf", n_restarts=1, eps=args.eps, seed=args.seed,
                                 loss="ce", rho=0.75, device=device)
                return with_clean(atk.perturb(xc, yc))

            def ref_t():
                atk = APGDAttack_targeted(model, n_iter=args.steps, norm="Linf", n_restarts=1, eps=args.eps,
                                          seed=args.seed, rho=0.75, n_target_classes=9, device=device)
                return with_clean(atk.perturb(xc, yc))

            runs["reference fp32"] = (ref_ce, ref_t, None, False)
        for label, (precision, channels_last, comp) in forms.items():
            m = form(model, precision, channels_last, comp)

            def ours_ce(m=m):
                return APGD(m, args.eps, steps=args.steps, loss="ce", seed=args.seed)(x, y)

            def ours_t(m=m):
                return APGDTargeted(m, args.eps, steps=args.steps, n_target_classes=9, seed=args.seed)(x, y)

            runs[f"ours {label}"] = (ours_ce, ours_t, precision, comp)
        for who, (ce, tg, precision, comp) in runs.items():
            entry = {}
            for name, fn in (("apgd-ce", ce), ("apgd-t", tg)):
                # the reference runs under torch's defaults; ours under its precision's switches. A
                # compiled model first runs once untimed: compilation is a one-off cost per run of a tool.
                with numerics(precision) if precision else contextlib.nullcontext():
                    x_adv, seconds = timed(fn, device, args.repeats, warmup=1 if comp else 0)
                linf = float((x_adv - x).abs().flatten(1).amax(1).max())
                assert linf <= args.eps + 1e-5, f"{who} {name} left the ball: {linf}"
                entry[name] = {"seconds": seconds, "robust_accuracy": robust_accuracy(model, x_adv, y)}
            entry["total_seconds"] = entry["apgd-ce"]["seconds"] + entry["apgd-t"]["seconds"]
            attack_results[who] = entry
            results["attacks_vs_reference"] = attack_results
            save()
            print(f"  {who}: {entry}", flush=True)
        ref = attack_results.get("reference fp32")
        for who, entry in attack_results.items():
            row = {"attack run": who, "APGD-CE s": entry["apgd-ce"]["seconds"], "APGD-T s": entry["apgd-t"]["seconds"],
                   "robust CE %": entry["apgd-ce"]["robust_accuracy"], "robust T %": entry["apgd-t"]["robust_accuracy"]}
            if ref is not None:
                entry["speedup_vs_reference"] = ref["total_seconds"] / entry["total_seconds"]
                entry["diff_points_ce"] = entry["apgd-ce"]["robust_accuracy"] - ref["apgd-ce"]["robust_accuracy"]
                entry["diff_points_t"] = entry["apgd-t"]["robust_accuracy"] - ref["apgd-t"]["robust_accuracy"]
                row.update({"speed-up": entry["speedup_vs_reference"], "diff CE pts": entry["diff_points_ce"],
                            "diff T pts": entry["diff_points_t"]})
            rows.append(row)
        results["attacks_vs_reference"] = attack_results
        print(f"\nown APGD vs pyautoattack: {n} images, clean accuracy {clean:.2f}%, linf eps={args.eps}, "
              f"{args.steps} steps, APGD-T 9 targets")
        print(format_table(rows))
        save()

        # ------------------------------------------------------------------ 3. certification sampling
        batch = args.certify_batch or (2000 if gpu else 1000)
        draws = (args.certify_draws or 10 * batch) // batch * batch  # whole batches: the floor runs the same passes
        cert_rows = []
        results["certify"] = {}
        cert_forms = {"fp32": ("fp32", False)}
        if gpu:
            cert_forms.update({"bf16": ("bf16", False), "bf16+cl": ("bf16", True)})
        x0 = x[0]
        for label, (precision, channels_last) in cert_forms.items():
            m = form(model, precision, channels_last)
            smooth = Smooth(m, test.num_classes, 0.25, seed=args.seed)
            noisy = (x0.unsqueeze(0) + 0.25 * torch.randn(batch, *x0.shape, device=device)).contiguous()

            def forward_floor():  # the same forward passes on one fixed batch: no noise, no bookkeeping
                with torch.inference_mode():
                    for _ in range(draws // batch):
                        out = m(noisy).argmax(1)
                return out

            with numerics(precision):
                _, t_s = timed(lambda: smooth.sample_predictions(x0, draws, batch), device, args.repeats, warmup=1)
                _, t_f = timed(forward_floor, device, args.repeats, warmup=1)
            floor_rate = (draws // batch) * batch / t_f
            rate = draws / t_s
            results["certify"][label] = {"samples_per_s": rate, "forward_floor_samples_per_s": floor_rate,
                                         "ratio": rate / floor_rate, "batch": batch, "draws": draws}
            cert_rows.append({"precision": label, "samples/s": rate, "forward floor/s": floor_rate,
                              "ratio": rate / floor_rate})
            print(f"  certify {label}: {results['certify'][label]}", flush=True)
        print(f"\ncertify sampling: {draws} noisy copies of one image, {batch} per forward pass")
        print(format_table(cert_rows))
        save()

    # ------------------------------------------------------------------ 4. per-iteration cost over the floor
    n_iter = args.iter_n or n
    xi, yi = x[:n_iter], y[:n_iter]
    variants = {"fp32": ("fp32", False, False)}
    if gpu:
        variants.update({"tf32": ("tf32", False, False), "bf16": ("bf16", False, False),
                         "bf16+cl": ("bf16", True, False)})
        if not args.no_compile:
            variants["bf16+cl+compile"] = ("bf16", True, True)
    elif not args.no_compile:
        variants["fp32+compile"] = ("fp32", False, True)
    iter_rows = []
    results["per_iteration"] = {}
    for label, (precision, channels_last, comp) in variants.items():
        m = form(model, precision, channels_last, comp)
        with numerics(precision):
            attack = APGD(m, args.eps, steps=args.steps, loss="ce", seed=args.seed, attack_misclassified=True)
            attack.sync_free = True
            _, t_attack = timed(lambda: attack(xi, yi), device, args.repeats, warmup=1 if (gpu or comp) else 0)
            t_f, t_fb, floor = floors(m, xi, device, args.repeats, args.steps)
        entry = {"forward_s": t_f, "forward_backward_s": t_fb, "attack_s": t_attack, "floor_s": floor,
                 "ratio": t_attack / floor}
        results["per_iteration"][label] = entry
        iter_rows.append({"variant": label, "fwd ms": 1e3 * t_f, "fwd+bwd ms": 1e3 * t_fb, "APGD-CE s": t_attack,
                          "floor s": floor, "attack / floor": entry["ratio"]})
        print(f"  per-iteration {label}: {entry}", flush=True)
    if not gpu:
        # The CPU default drops broken inputs, which makes it cheaper than the full-batch floor. Its
        # own overhead shows where nothing breaks: eps = 0 on correctly classified inputs.
        attack = APGD(model, args.eps, steps=args.steps, loss="ce", seed=args.seed, attack_misclassified=True)
        _, t_compact = timed(lambda: attack(xi, yi), device, args.repeats)
        floor = results["per_iteration"]["fp32"]["floor_s"]
        results["per_iteration"]["fp32 (CPU default: broken inputs dropped)"] = {"attack_s": t_compact,
                                                                                "ratio": t_compact / floor}
        iter_rows.append({"variant": "fp32, broken dropped", "APGD-CE s": t_compact, "floor s": floor,
                          "attack / floor": t_compact / floor})
        keep = (model(xi).argmax(1) == yi).nonzero().squeeze(1)
        xk, yk = xi[keep], yi[keep]
        attack = APGD(model, 0.0, steps=args.steps, loss="ce", seed=args.seed)
        _, t_zero = timed(lambda: attack(xk, yk), device, args.repeats)
        t_f, t_fb, floor = floors(model, xk, device, args.repeats, args.steps)
        entry = {"inputs": len(keep), "attack_s": t_zero, "floor_s": floor, "ratio": t_zero / floor}
        results["per_iteration"]["fp32 CPU default, nothing breaks (eps 0)"] = entry
        iter_rows.append({"variant": f"fp32 default, eps 0 ({len(keep)} in)", "fwd ms": 1e3 * t_f,
                          "fwd+bwd ms": 1e3 * t_fb, "APGD-CE s": t_zero, "floor s": floor,
                          "attack / floor": entry["ratio"]})
    print(f"\nAPGD-CE per-iteration cost: {n_iter} inputs, all attacked for all {args.steps} steps; "
          f"floor = steps x (fwd + bwd) + 2 fwd")
    print(format_table(iter_rows))
    save()

    # ------------------------------------------------------------------ targets
    checks = []
    if args.only_per_iteration:
        pass
    elif gpu:
        fast = min((w for w in attack_results if w.startswith("ours bf16")),
                   key=lambda w: attack_results[w]["total_seconds"])
        if ref is not None:
            e = attack_results[fast]
            checks.append((f"{fast} APGD-CE + APGD-T >= 2.5x faster than pyautoattack fp32",
                           e["speedup_vs_reference"], e["speedup_vs_reference"] >= 2.5))
            worst = max(abs(e["diff_points_ce"]), abs(e["diff_points_t"]))
            checks.append((f"{fast} robust accuracy within 0.3 points of pyautoattack", worst, worst <= 0.3))
        c = results["certify"]["bf16"]["ratio"]
        checks.append(("certify bf16 >= 0.95x the bf16 forward floor", c, c >= 0.95))
    else:
        c = results["certify"]["fp32"]["ratio"]
        checks.append(("CPU certify >= 0.95x the forward floor", c, c >= 0.95))
    if not gpu:
        r = results["per_iteration"]["fp32"]["ratio"]
        checks.append(("CPU APGD-CE per-iteration cost <= 1.05x the floor (sync-free, all attacked)", r, r <= 1.05))
        r = results["per_iteration"]["fp32 CPU default, nothing breaks (eps 0)"]["ratio"]
        checks.append(("CPU APGD-CE per-iteration cost <= 1.05x the floor (CPU default path)", r, r <= 1.05))
        if ref is not None:
            s = attack_results["ours fp32"]["speedup_vs_reference"]
            checks.append(("CPU own APGD-CE + APGD-T time / pyautoattack's", 1 / s, None))
    results["targets"] = [{"target": t, "value": v, "met": m} for t, v, m in checks]
    save()
    print(f"\ntargets on {where}:")
    for t, v, met in checks:
        print(f"  {t}: {v:.3f} -> {'met' if met else ('NOT met' if met is not None else 'info')}")
    print(f"wrote {out / f'results-{device.type}.json'}")


if __name__ == "__main__":
    main()
