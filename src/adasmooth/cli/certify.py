"""``adasmooth certify``: randomized-smoothing certificates of base models and of their mixtures.

Examples::

    adasmooth certify --model runs/gauss025 runs/gauss05 --n 100000 --n-examples 500
    adasmooth certify --model runs/gauss025 --std runs/std --alpha 0.8,0.9 --hardmax

sigma comes from each checkpoint's sidecar unless ``--sigma`` is given; the data set likewise.

Long runs: every counted input (its selection and estimation counts for every sigma, and g's logits)
is appended to the journal ``PREFIX.json.journal``; a run killed at any moment and started again with
the same command continues where it stopped (``--restart`` starts over). The certificates, TSVs,
counts JSONs and PNGs are computed from the counts once every input is counted, so the Cohen TSV is
written whole at the end, not line by line (the journal keeps interrupted work). Under
``torchrun --nproc-per-node N -m adasmooth certify ...`` each process counts a strided share of the
inputs (one device per rank) and rank 0 writes every file; the noise is seeded per input, so the
certificates are those of one process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ..core.checks import check_finite
from ..core.config import CheckpointDataOptions, DataLoadingOptions, n_examples_option, option, output_option
from ..core.precision import Precision, channels_last_option, compile_option, parse_batch_size, precision_option
from ..data.images import ImageOptions, image_options
from ..models.checkpoint import check_input_shape, recorded_dataset, load_checkpoint_data
from ..models.loader import model_dir_option
from .common import checkpoint_files, narrate

DEFAULT_RADII = [round(0.05 * i, 4) for i in range(31)]


@dataclass
class CertifyConfig(CheckpointDataOptions, DataLoadingOptions):
    model: list[str] = option(default_factory=list,
                              help="smoothed base model checkpoint(s) h; the first is the frontier baseline")
    sigma: float | None = option(None, help="noise level (one model only); none: the checkpoint's sigma")
    std: str | None = option(None, help="standard model g (any model spec): also certify the mixture "
                                        "(Theorems A.2 and 3.5)")
    model_dir: str | None = model_dir_option()
    alpha: list[float] = option(default_factory=list, help="mixing weight(s) of h to certify, e.g. 0.8,0.9")
    hardmax: bool = option(False, help="use a one-hot g (Appendix A.2)")
    std_scale: float = option(1.0, help="logit scale of g")
    image: ImageOptions = image_options()
    split: Literal["train", "val", "test"] = option("test", help="data split")
    n0: int = option(100, help="selection draws per input")
    # -N: under torchrun, whose parser takes --n for an abbreviation of its own --nnodes/--nproc-per-node
    n: int = option(100_000, help="estimation draws per input (also -N, the spelling torchrun passes on)",
                    short="-N")
    alpha_conf: float = option(0.001, help="failure probability of every certificate")
    batch_size: int | str = option(1000, help="noisy copies per forward pass, or auto: the most that fit in device memory")
    precision: Precision = precision_option()
    channels_last: bool = channels_last_option()
    compile: bool = compile_option()
    n_examples: int | None = n_examples_option(500)
    skip: int = option(1, help="certify every k-th input")
    radii: list[float] = option(default_factory=lambda: list(DEFAULT_RADII), help="radii of the curves")
    frontier_alphas: list[float] = option(default_factory=lambda: [round(0.5 + 0.01 * i, 2) for i in range(51)],
                                          help="alpha grid searched for the (alpha, sigma) frontier")
    restart: bool = option(False, help="start over: delete the journal an earlier run with another config left")
    output: str = output_option("runs/certify", "output prefix: PREFIX.json, TSVs and PNGs beside it")

    def validate(self) -> None:
        if not self.model:
            raise ValueError("give at least one --model checkpoint (the smoothed base classifier)")
        check_finite("sigma", self.sigma, 0, strict=True)
        if self.sigma is not None and len(self.model) > 1:
            raise ValueError("--sigma can only be given with a single --model (each sidecar records its own)")
        if self.alpha and self.std is None:
            raise ValueError("--alpha needs --std CKPT (the standard model g of the mixture)")
        for a in self.alpha:
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"alpha must lie in [0, 1], got {a}")
        self.batch_size = parse_batch_size(self.batch_size)
        if self.n0 < 1 or self.n < 1 or self.skip < 1:
            raise ValueError("n0, n and skip must be >= 1")
        if not 0.0 < self.alpha_conf < 1.0:
            raise ValueError(f"alpha_conf (failure probability) must lie in (0, 1), got {self.alpha_conf}")
        if self.n_examples is not None and self.n_examples < 1:
            raise ValueError(f"n_examples must be >= 1, got {self.n_examples}")
        if not self.radii:
            raise ValueError("radii must be a non-empty list of numbers >= 0")
        for radius in self.radii:
            check_finite("each radius", radius, 0)
        check_finite("std_scale", self.std_scale, 0, strict=True)


CONFIG = CertifyConfig


def files(cfg: CertifyConfig) -> tuple[list, list]:
    return checkpoint_files(*cfg.model, cfg.std), [f"{cfg.output}.json"]


# Fields the journal's records (each input's Monte Carlo counts and g's logits) do not depend on: a
# journal made under other values still resumes. Certificates are computed from the counts at the end,
# so alpha, radii, ... may change between the killed run and the resumed one, and so may batch_size (an
# input's noise comes in seeded blocks of draws whatever the batch); the device type may not (CPU and
# CUDA generators differ; the fingerprint records it as noise_device).
NOT_JOURNAL_FIELDS = ("progress", "device", "restart", "output", "n_examples", "skip", "alpha", "hardmax",
                      "std_scale", "alpha_conf", "radii", "frontier_alphas", "batch_size", "workers")


def run(cfg: CertifyConfig) -> int:
    """Certify; every counted input goes to a journal beside the output, so a killed run started again
    continues where it stopped; under torchrun each process counts a strided share of the inputs and
    rank 0 computes the certificates and writes every file."""
    from ..certify.mixed import count_inputs, counts_from_records, selected_indices
    from ..certify.report import certification_results, smoothed_classifiers, summary_rows
    from ..core.distributed import init_distributed, shard
    from ..core.io import format_table, write_result
    from ..core.journal import Journal, journal_path
    from ..core.precision import auto_batch_size, numerics, prepare_model
    from ..core.runtime import resolve_device, seed_everything
    from ..models.loader import load_model, model_info

    dist = init_distributed(cfg.device)
    device = resolve_device(dist.device(cfg.device))
    seed_everything(cfg.seed)
    models, infos, num_classes = {}, {}, None
    for path in cfg.model:
        info = model_info(path, model_dir=cfg.model_dir)
        sigma = cfg.sigma if cfg.sigma is not None else info.get("sigma")
        if sigma is None:
            raise ValueError(f"{path} has no 'sigma' in its sidecar (not trained with noise?); give --sigma")
        if float(sigma) in models:
            raise ValueError(f"two models share sigma={sigma}")
        model, infos[path] = load_model(path, device, model_dir=cfg.model_dir)
        models[float(sigma)] = model
        if num_classes is not None and int(infos[path]["num_classes"]) != num_classes:
            raise ValueError("the models disagree on the class count")
        num_classes = int(infos[path]["num_classes"])
    std_model = None
    if cfg.std is not None:
        std_model, infos[cfg.std] = load_model(cfg.std, device, model_dir=cfg.model_dir)
        if int(infos[cfg.std]["num_classes"]) != num_classes:
            raise ValueError(f"g has {infos[cfg.std]['num_classes']} classes but h has {num_classes}")
    dataset = recorded_dataset(cfg.dataset, infos, cfg.force_dataset)
    image, data = load_checkpoint_data(cfg, infos, dataset, cfg.split)
    cfg = dataclasses.replace(cfg, dataset=dataset, image=image)
    check_input_shape(infos, data.input_shape, dataset)
    models = {s: prepare_model(m, cfg.precision, cfg.channels_last, cfg.compile) for s, m in models.items()}
    if std_model is not None:
        std_model = prepare_model(std_model, cfg.precision, cfg.channels_last, cfg.compile)
    if cfg.batch_size == "auto":
        cfg = dataclasses.replace(cfg, batch_size=auto_batch_size(next(iter(models.values())), data.input_shape, device,
                                                                  gradients=False, precision=cfg.precision,
                                                                  cpu_default=1000))
        narrate(f"batch size auto: {cfg.batch_size}")

    selected = selected_indices(len(data), cfg.skip, cfg.n_examples)
    fingerprint = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_JOURNAL_FIELDS}
    fingerprint.update(sigmas=list(models), noise_device=device.type)
    path = journal_path(f"{cfg.output}.json")
    if cfg.restart and dist.is_main:
        Journal(path, fingerprint, restart=True).remove_all()
    dist.barrier()
    journal = Journal(path, fingerprint, part=f"rank{dist.rank}" if dist.active else None)
    pending = journal.pending(selected)
    if len(pending) < len(selected) and dist.is_main:
        narrate(f"resuming: {len(selected) - len(pending)} of {len(selected)} inputs already done ({path})")
    with numerics(cfg.precision):
        # the progress bar: of all inputs in one process, of rank 0's share under torchrun
        count_inputs(smoothed_classifiers(models, num_classes, cfg.seed), data, cfg.n0, cfg.n, cfg.batch_size,
                     std_model=std_model, indices=shard(pending, dist), device=device,
                     progress=cfg.progress and dist.is_main, on_input=lambda record, _: journal.append([record]),
                     done_before=0 if dist.active else len(selected) - len(pending))
    dist.barrier()
    if not dist.is_main:
        return 0
    journal = Journal(path, fingerprint, part="rank0" if dist.active else None)  # every process's records
    counts = counts_from_records([journal.done[i] for i in selected], list(models), cfg.n0, cfg.n)
    results = certification_results(counts, alphas=cfg.alpha, alpha_conf=cfg.alpha_conf, radii=cfg.radii,
                                    frontier_alphas=cfg.frontier_alphas, std_hardmax=cfg.hardmax,
                                    std_scale=cfg.std_scale, prefix=cfg.output)
    results["dataset"] = dataset
    out = write_result(f"{cfg.output}.json", results, cfg, cfg.seed)
    journal.remove_all()
    print(f"{dataset} {cfg.split}, {len(selected)} inputs, seed {cfg.seed}"
          + (f", {dist.world_size} processes" if dist.active else ""))
    show = [r for r in (0.0, 0.25, 0.5, 0.75, 1.0) if any(abs(r - x) < 1e-9 for x in cfg.radii)] or cfg.radii[:5]
    print(format_table(summary_rows(results, show), precision=1))
    for m in results["models"]:
        print(f"sigma={m['sigma']:g}: {m['examples']} inputs, {m['noisy_samples_per_second']:.0f} noisy samples/s, "
              f"{m['images_per_second']:.2f} images/s (per second of compute)")
    print(f"n={cfg.n}, n0={cfg.n0}, {cfg.precision}, confidence {100 * (1 - cfg.alpha_conf):.2f}% per certificate. {results['statistics']}")
    narrate(f"wrote {out} (+ TSV / PNG beside it)")
    return 0
