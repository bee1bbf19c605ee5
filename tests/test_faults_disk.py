"""A full disk, for every command that writes results: one line, exit code 2, no partial or temporary
file left, earlier results untouched. Once on a real 200 kB tmpfs (where this process may mount one), and
always with ENOSPC raised at the write."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from adasmooth.cli import main
from adasmooth.core.errors import OutputError
from adasmooth.core.io import atomic_stream, save_resume_state, write_json

from digits_models import save_smoothing_checkpoints

TMPFS_BYTES = 200 * 1024


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_smoothing_checkpoints(tmp_path_factory.mktemp("disk"))


@pytest.fixture
def small_disk(tmp_path):
    """A real 200 kB file system (tmpfs), unmounted afterwards."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path, leave: int) -> None:
    """Fill ``folder``'s file system up to ``leave`` free bytes."""
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    (folder / "filler").write_bytes(b"\0" * max(0, free - leave))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def commands(ckpt: dict[str, str], out: Path) -> dict[str, list[str]]:
    model, pair = ckpt["g"], ["--std", ckpt["g"], "--rob", ckpt["h25"]]
    return {
        "evaluate": ["evaluate", "--model", model, "--eps", "0.1", "--norm", "linf", "--attacks", "pgd",
                     "--n-examples", "40", "--batch-size", "20", "-o", str(out / "e.json")],
        "certify": ["certify", "--model", ckpt["h25"], "--n0", "10", "--n", "100", "--n-examples", "40",
                    "--batch-size", "100", "-o", str(out / "cert")],
        "sweep": ["sweep", *pair, "--eps", "0.1", "--norm", "linf", "--alphas", "0,1", "--steps", "2",
                  "--n-examples", "40", "-o", str(out / "sweep")],
        "train-base": ["train-base", "--epochs", "1", "--n-train", "64", "--eval-examples", "8",
                       "-o", str(out / "m")],
        "export": ["export", *pair, "--alpha", "0.5", "--input-shape", "1", "8", "8", "-o", str(out / "mix.pt")],
    }


# Files a run may leave on a full disk: its journal holds finished work only (what a rerun resumes from).
ALLOWED_NEW = (".journal",)


def assert_one_line_and_nothing_partial(rc: int, err: str, before: dict[str, bytes], folder: Path) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "no space left on the device" in lines[0], lines
    after = snapshot(folder)
    for name, data in before.items():
        assert after.get(name) == data, f"{name} was changed"
    new = [name for name in after if name not in before]
    assert all(name.endswith(ALLOWED_NEW) for name in new), new
    assert not [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".lock"))]


@pytest.mark.parametrize("command", ["evaluate", "certify", "sweep", "train-base", "export"])
def test_a_full_real_disk_is_one_line_and_leaves_nothing_partial(command, checkpoints, small_disk, capsys):
    earlier = small_disk / "earlier.json"
    write_json(earlier, {"results": "of an earlier run"})
    argv = commands(checkpoints, small_disk)[command]
    out = Path(argv[argv.index("-o") + 1])
    if command == "evaluate":  # an earlier result at the very output: a failed rewrite must keep it
        write_json(out, {"results": "of an earlier evaluate"})
    fill(small_disk, leave=12 * 1024)
    before = snapshot(small_disk)
    rc = main([*argv, "--no-progress", "--device", "cpu"])
    assert_one_line_and_nothing_partial(rc, capsys.readouterr().err, before, small_disk)


@pytest.mark.parametrize("command", ["evaluate", "certify", "sweep", "train-base", "export"])
def test_enospc_at_the_write_is_one_line_and_leaves_nothing_partial(command, checkpoints, tmp_path, capsys,
                                                                     monkeypatch):
    """Simulated: every file reaching the disk fails with ENOSPC (as fsync reports it where the disk fills
    only when the data are written out)."""
    folder = tmp_path / "out"
    folder.mkdir()
    argv = commands(checkpoints, folder)[command]
    write_json(folder / "earlier.json", {"results": "of an earlier run"})
    before = snapshot(folder)

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    rc = main([*argv, "--no-progress", "--device", "cpu"])
    assert_one_line_and_nothing_partial(rc, capsys.readouterr().err, before, folder)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torch_writers_on_a_full_real_disk_raise_the_one_line_error(small_disk):
    """Given a path, torch.save hides a full disk behind RuntimeError("unexpected pos ...") and
    torch.jit.save aborts the process; through core.io both are an OutputError and leave no file."""
    fill(small_disk, leave=12 * 1024)
    before = snapshot(small_disk)
    with pytest.raises(OutputError, match="no space left on the device to write .*resume.pt"):
        save_resume_state(small_disk / "resume.pt", {"w": torch.zeros(100_000)}, {"seed": 0})
    scripted = torch.jit.script(torch.nn.Linear(200, 200))
    with pytest.raises(OutputError, match="mix.pt"):
        atomic_stream(small_disk / "mix.pt", lambda f: torch.jit.save(scripted, f))
    assert snapshot(small_disk) == before


def test_atomic_stream_passes_on_other_errors(tmp_path):
    def broken(f):
        f.write(b"abc")
        raise KeyError("not a disk problem")

    with pytest.raises(KeyError):
        atomic_stream(tmp_path / "x", broken)
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_give_files_the_usual_mode(tmp_path):
    """mkstemp's temporary file is private (0600): a result renamed from it was unreadable to the group."""
    mask = os.umask(0o022)
    try:
        write_json(tmp_path / "new.json", {"a": 1})
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o644
        (tmp_path / "new.json").chmod(0o640)
        write_json(tmp_path / "new.json", {"a": 2})  # a rewrite keeps the file's own mode
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(mask)
