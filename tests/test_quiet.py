"""``--quiet`` silences a command's narrative (what it does, what it resumed, which files it wrote) and its
progress, and keeps the results it was run for; without it the narrative is shown on stdout."""

import pytest

from adasmooth.cli import main

TINY_DEMO = ["demo", "--epochs", "1", "--n-train", "128", "--n-examples", "24", "--alphas", "0,1", "--variants", "prob",
             "--steps", "2"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("quiet") / "demo"
    assert main([*TINY_DEMO, "--quiet", "--output", str(out)]) == 0
    return out


def test_demo_quiet_keeps_results_only(tmp_path, capsys):
    assert main([*TINY_DEMO, "--quiet", "--output", str(tmp_path / "q")]) == 0
    captured = capsys.readouterr()
    assert "[demo]" not in captured.out and "wrote" not in captured.out and "sweep:" not in captured.out
    assert "epoch" not in captured.out + captured.err  # neither the training log nor its progress bars
    assert "g alone: clean" in captured.out and "prob" in captured.out  # the results table stays
    assert captured.err == ""


def test_demo_without_quiet_narrates(tmp_path, capsys):
    assert main([*TINY_DEMO, "--no-progress", "--output", str(tmp_path / "v")]) == 0
    out = capsys.readouterr().out
    assert "[demo] training the standard model g" in out and "[demo] done in" in out
    assert "sweep: 2 alphas" in out and "wrote " in out and "g alone: clean" in out


def test_sweep_quiet_keeps_table_and_drops_narrative(demo_dir, tmp_path, capsys):
    args = ["sweep", "--std", str(demo_dir / "std"), "--rob", str(demo_dir / "rob"), "--alphas", "0,0.5,1",
            "--n-examples", "16", "--steps", "2"]
    assert main([*args, "--quiet", "--output", str(tmp_path / "q")]) == 0
    quiet = capsys.readouterr()
    assert "sweep:" not in quiet.out and "wrote" not in quiet.out and quiet.err == ""
    assert "g alone: clean" in quiet.out and "0.50" in quiet.out
    assert main([*args, "--no-progress", "--output", str(tmp_path / "v")]) == 0
    loud = capsys.readouterr().out
    assert loud.startswith("sweep: 3 alphas") and "wrote " in loud
