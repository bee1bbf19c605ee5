"""Training on several processes: synchronised batch norm against torch's batch norm on the whole batch,
the distributed sampler, and `torchrun -m adasmooth train-base` against one process (gloo, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from adasmooth.core.distributed import SyncedBatchNorm, batch_mean_std, restore_batchnorm, synchronise_batchnorm
from adasmooth.data.stream import EpochBatchSampler


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _port() -> str:
    return str(29600 + os.getpid() % 1000)


# ---------------------------------------------------------------------------- synchronised batch norm

def _synced_rank(rank: int, world: int, store: str, x: torch.Tensor, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    norm = synchronise_batchnorm(nn.Sequential(nn.BatchNorm2d(3, momentum=0.3)))
    with torch.no_grad():
        norm[0].weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        norm[0].bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    mine = x[rank::world].clone().requires_grad_(True)
    y = norm(mine)
    # a loss that weighs rows differently, summed over the ranks (what DDP's gradient average scales)
    (y * torch.arange(1, y.numel() + 1, dtype=y.dtype).view_as(y).sin()).sum().backward()
    torch.save({"y": y.detach(), "x_grad": mine.grad, "w_grad": norm[0].weight.grad, "b_grad": norm[0].bias.grad,
                "state": norm[0].state_dict(), "mean_std": batch_mean_std(mine)}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_synced_batchnorm_on_two_processes_equals_torch_batchnorm_on_the_whole_batch(tmp_path):
    """Each of 2 gloo processes holds half the batch; outputs, input gradients and running statistics
    must equal nn.BatchNorm2d applied to the whole batch in one process."""
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64).float() * 3 + 1
    out = str(tmp_path / "rank")
    torch.multiprocessing.spawn(_synced_rank, args=(2, str(tmp_path / "store"), x, out), nprocs=2)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]

    norm = nn.BatchNorm2d(3, momentum=0.3)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        norm.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    whole = x.clone().requires_grad_(True)
    y = norm(whole)
    # the same per-rank weights, laid out by rank as the ranks saw them
    weights = torch.empty_like(y)
    for r in range(2):
        part = y[r::2]
        weights[r::2] = torch.arange(1, part.numel() + 1, dtype=y.dtype).view_as(part).sin()
    (y * weights).sum().backward()
    for r in range(2):
        torch.testing.assert_close(ranks[r]["y"], y.detach()[r::2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ranks[r]["x_grad"], whole.grad[r::2], rtol=1e-4, atol=1e-5)
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(ranks[r]["state"][key], norm.state_dict()[key], rtol=1e-5, atol=1e-6)
    # DDP averages the parameter gradients over ranks; their sum is the whole batch's gradient
    torch.testing.assert_close(ranks[0]["w_grad"] + ranks[1]["w_grad"], norm.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ranks[0]["b_grad"] + ranks[1]["b_grad"], norm.bias.grad, rtol=1e-4, atol=1e-5)
    # the mixing network's clamp statistics: mean and unbiased std of the whole batch, on every rank
    for r in range(2):
        torch.testing.assert_close(torch.stack(ranks[r]["mean_std"]), torch.stack([x.mean(), x.std()]))


def test_synchronise_and_restore_keep_the_state_dict_and_the_classes():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Sequential(nn.Flatten(), nn.BatchNorm1d(8)))
    model[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight, running_var = model[1].weight, model[1].running_var
    synchronise_batchnorm(model)
    assert isinstance(model[1], SyncedBatchNorm) and isinstance(model[2][1], SyncedBatchNorm)
    # the same objects: an optimizer made before the swap goes on training them
    assert model[1].weight is weight and model[1].running_var is running_var
    assert model.state_dict().keys() == before.keys()
    x = torch.randn(4, 1, 4, 4)
    model.train()
    y_synced = model(x)  # no process group: plain batch norm
    restore_batchnorm(model)
    assert type(model[1]) is nn.BatchNorm2d and type(model[2][1]) is nn.BatchNorm1d
    assert model[1].weight is weight
    assert model[1].running_mean.shape == (2,)
    model.load_state_dict(before)
    torch.testing.assert_close(model(x), y_synced)


# ---------------------------------------------------------------------------- the distributed sampler

def test_the_ranks_shares_of_each_batch_make_up_the_one_process_batch():
    one = list(EpochBatchSampler(23, 8, seed=3, epoch=2))
    shares = [list(EpochBatchSampler(23, 8, seed=3, epoch=2, shard=(r, 3))) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]
    for b, batch in enumerate(one):
        merged = [i for s in shares for i in s[b]]
        assert sorted(merged) == sorted(batch)
        assert shares[1][b] == batch[1::3]
    # 25 examples in batches of 8 on 3 processes: the last batch holds 1 example and is left out
    assert len(list(EpochBatchSampler(25, 8, shard=(0, 3)))) == 3
    assert len(list(EpochBatchSampler(25, 8))) == 4
    with pytest.raises(ValueError, match="rank"):
        EpochBatchSampler(10, 4, shard=(2, 2))


# ---------------------------------------------------------------------------- train-base under torchrun

def _train_cmd(out: Path, config: Path, epochs: int = 2) -> list[str]:
    return ["train-base", "--config", str(config), "--dataset", "digits", "--method", "gaussian", "--sigma", "0.25",
            "--epochs", str(epochs), "--batch-size", "16", "--n-train", "64", "--lr", "0.05",
            "--eval-examples", "20", "--eval-pgd-steps", "2", "--device", "cpu", "--no-progress", "-o", str(out)]


def test_train_base_on_two_processes_follows_the_one_process_loss_curve(tmp_path):
    """Gaussian-noise training of a batch-norm ResNet: `torchrun --nproc-per-node 2` (DDP, synchronised
    batch norm, noise drawn per example) gives the loss curve and weights of one process."""
    from adasmooth.models.checkpoint import load_checkpoint

    config = tmp_path / "net.json"
    config.write_text(json.dumps({"arch": "resnet18", "model_kwargs": {"width": 4}}))
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([sys.executable, "-m", "adasmooth", *_train_cmd(one, config)], env=_env(),
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    ran = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          _port(), "-m", "adasmooth", *_train_cmd(two, config)], env=_env(), capture_output=True,
                         text=True)
    assert ran.returncode == 0, ran.stderr[-3000:]
    model_one, meta_one = load_checkpoint(one)
    model_two, meta_two = load_checkpoint(two)
    losses_one = [h["train_loss"] for h in meta_one["training"]["history"]]
    losses_two = [h["train_loss"] for h in meta_two["training"]["history"]]
    assert meta_two["training"]["processes"] == 2 and len(losses_two) == 2
    assert losses_one == pytest.approx(losses_two, abs=1e-4)
    assert losses_one[1] < losses_one[0], "the loss did not move: the comparison would say little"
    state_one, state_two = model_one.state_dict(), model_two.state_dict()
    assert any("running_var" in k for k in state_one), "no batch norm in the model: nothing synchronised"
    for key, value in state_one.items():
        torch.testing.assert_close(state_two[key].double(), value.double(), rtol=1e-3, atol=1e-4, msg=key)
    assert not Path(str(two) + ".resume.pt").exists()


def test_cat_rs_under_torchrun_is_refused_with_one_line(tmp_path):
    ran = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(int(_port()) + 1), "-m", "adasmooth", "train-base", "--method", "cat-rs", "--epochs", "1",
                          "--n-train", "8", "--device", "cpu", "--no-progress", "-o", str(tmp_path / "c")],
                         env=_env(), capture_output=True, text=True)
    assert ran.returncode != 0
    assert ran.stderr.count("adasmooth train-base: error: training method 'cat-rs' does not run under torchrun") == 2
    assert "train/loop.py" not in ran.stderr  # torchrun prints its own traceback of the failed children; none of ours


# ---------------------------------------------------------------------------- train-mixnet under torchrun

@pytest.fixture(scope="module")
def digits_bases(tmp_path_factory):
    """A briefly trained standard CNN g and an untrained h (threat recorded: linf 0.2) on digits."""
    from adasmooth.data import DATASET_STATS
    from adasmooth.models import create_model
    from adasmooth.models.checkpoint import save_checkpoint
    from adasmooth.train.loop import TrainConfig, train_base

    root = tmp_path_factory.mktemp("bases")
    train_base(TrainConfig(dataset="digits", arch="small-cnn", model_kwargs={"width": 4, "hidden": 16}, epochs=3,
                           lr=0.1, batch_size=32, n_train=300, eval_examples=20, eval_pgd_steps=1,
                           output=str(root / "g"), progress=False, device="cpu"))
    torch.manual_seed(3)
    mean, std = DATASET_STATS["digits"]
    h = create_model("small-cnn", 10, in_channels=1, mean=mean, std=std, width=4, hidden=16)
    save_checkpoint(h, root / "h", {"dataset": "digits", "metrics": {"eval_eps": 0.2, "eval_norm": "linf"}})
    return root


def test_train_mixnet_on_two_processes_follows_the_one_process_run(digits_bases, tmp_path):
    """Setting C (an APGD-CE and a targeted APGD-DLR copy of every input), extra clean inputs, EMA and the
    per-epoch held-out measurement (rank 0 measures, the others receive its numbers): `torchrun
    --nproc-per-node 2` gives one process's loss curve, alpha statistics, held-out measurements, exported
    network (batch norm re-estimated over both ranks' inputs) and final measurement."""
    from safetensors.torch import load_file

    cmd = ["train-mixnet", "--std", str(digits_bases / "g"), "--rob", str(digits_bases / "h"), "--widths", "4,8,8",
           "--blocks", "1,1,1", "--setting", "C", "--extra-clean", "1", "--ema-decay", "0.5", "--attack-steps", "2",
           "--epochs", "2", "--batch-size", "16", "--n-train", "64", "--lr", "3e-3", "--eval-examples", "8",
           "--eval-pgd-steps", "1", "--device", "cpu", "--no-progress", "--n-targets", "1", "--monitor-examples", "24",
           # which epoch is best rests on counts of 24 images: rounding could flip one and export another epoch
           "--no-keep-best"]
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([sys.executable, "-m", "adasmooth", *cmd, "-o", str(one)], env=_env(),
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    ran = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(int(_port()) + 2), "-m", "adasmooth", *cmd, "-o", str(two)], env=_env(),
                         capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.count("wrote ") == 1, "only rank 0 reports"
    meta_one, meta_two = (json.loads(Path(f"{p}.json").read_text()) for p in (one, two))
    assert meta_two["training"]["processes"] == 2
    for a, b in zip(meta_one["training"]["history"], meta_two["training"]["history"], strict=True):
        for key in ("train_loss", "alpha_clean", "alpha_adv", "acc_clean", "acc_adv"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
        for key in ("clean_acc", "attacked_acc", "alpha_clean", "alpha_attacked", "detection_auc"):
            assert a["monitor"][key] == pytest.approx(b["monitor"][key], abs=1e-3), key
    first, last = meta_one["training"]["history"][0], meta_one["training"]["history"][-1]
    # 8 steps against a strengthening training attack: the loss may rise (1.86 -> 1.99 for this seed);
    # what matters is that training changed the network, so that agreement means something
    assert abs(last["train_loss"] - first["train_loss"]) > 1e-2, "the loss did not move: the comparison would say little"
    for key, value in meta_one["metrics"].items():
        assert meta_two["metrics"][key] == pytest.approx(value, abs=1e-4), key
    weights_one, weights_two = load_file(f"{one}.safetensors"), load_file(f"{two}.safetensors")
    assert any("running_var" in k for k in weights_one)
    for key, value in weights_one.items():
        torch.testing.assert_close(weights_two[key].double(), value.double(), rtol=1e-4, atol=1e-5, msg=key)


def test_train_base_under_torchrun_killed_mid_run_resumes_to_the_same_model(tmp_path):
    """Two processes killed (SIGKILL to the whole process group) after the resume file of epoch 1 and
    started again continue from it and end where an uninterrupted 2-process run ends."""
    import signal
    import time

    from adasmooth.models.checkpoint import load_checkpoint
    from adasmooth.train.loop import resume_path

    config = tmp_path / "net.json"
    config.write_text(json.dumps({"arch": "resnet18", "model_kwargs": {"width": 4}}))

    def cmd(out: Path, port: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
                "-m", "adasmooth", *_train_cmd(out, config, epochs=3)]

    full, killed = tmp_path / "full", tmp_path / "killed"
    base = int(_port()) + 3
    subprocess.run(cmd(full, base), env=_env(), check=True, capture_output=True)
    proc = subprocess.Popen(cmd(killed, base + 1), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    resume = resume_path(killed)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not resume.is_file():
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    # torchrun starts its workers in sessions of their own: kill them, then torchrun (a machine going down)
    for worker in _children(proc.pid):
        os.kill(worker, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert resume.is_file() and not Path(f"{killed}.safetensors").exists()
    again = subprocess.run(cmd(killed, base + 2), env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stdout and again.stdout.count("resuming") == 1
    model_full, meta_full = load_checkpoint(full)
    model_killed, meta_killed = load_checkpoint(killed)
    assert [h["train_loss"] for h in meta_killed["training"]["history"]] == pytest.approx(
        [h["train_loss"] for h in meta_full["training"]["history"]], abs=1e-6)
    for key, value in model_full.state_dict().items():
        torch.testing.assert_close(model_killed.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_train_mixnet_with_fewer_batch_inputs_than_processes_is_refused_with_one_line(digits_bases, tmp_path):
    ran = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--master-port",
                          str(int(_port()) + 6), "-m", "adasmooth", "train-mixnet", "--std", str(digits_bases / "g"),
                          "--rob", str(digits_bases / "h"), "--batch-size", "2", "--epochs", "1", "--device", "cpu",
                          "--no-progress", "-o", str(tmp_path / "m")], env=_env(), capture_output=True, text=True)
    assert ran.returncode != 0
    assert ran.stderr.count("adasmooth train-mixnet: error: batch_size 2 is smaller than the 3 processes") == 3
    assert "train/mixnet.py" not in ran.stderr
    assert not list(tmp_path.iterdir())


def test_batches_per_epoch_leaves_out_a_last_batch_smaller_than_the_processes():
    from adasmooth.data.stream import batches_per_epoch

    assert batches_per_epoch(25, 8) == 4 and batches_per_epoch(25, 8, world_size=3) == 3
    assert batches_per_epoch(26, 8, world_size=2) == 4  # a last batch of 2 feeds both processes
    assert batches_per_epoch(25, 8, drop_last=True, world_size=3) == 3
    assert batches_per_epoch(0, 8, world_size=2) == 0
