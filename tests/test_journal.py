"""The run journal (resume after a kill) and the process-sharding helpers."""

from __future__ import annotations

import json

import pytest

from adasmooth.core.distributed import Distributed, init_distributed, shard
from adasmooth.core.errors import CheckpointError
from adasmooth.core.journal import Journal, journal_path


def test_journal_keeps_finished_records_across_runs(tmp_path):
    path = journal_path(tmp_path / "out.json")
    assert path.name == "out.json.journal"
    first = Journal(path, {"eps": 0.1, "attacks": ["pgd"]})
    first.append([{"index": 0, "ok": True}, {"index": 1, "ok": False}])
    first.append([{"index": 4, "ok": True}])
    again = Journal(path, {"eps": 0.1, "attacks": ["pgd"]})
    assert again.done == {0: {"index": 0, "ok": True}, 1: {"index": 1, "ok": False}, 4: {"index": 4, "ok": True}}
    assert again.pending(range(6)) == [2, 3, 5]


def test_a_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "j"
    Journal(path, {"a": 1}).append([{"index": 3}])
    with path.open("a") as f:
        f.write('{"records": [{"index": 7')  # killed mid-write
    assert set(Journal(path, {"a": 1}).done) == {3}


def test_damage_before_the_last_line_is_an_error(tmp_path):
    path = tmp_path / "j"
    journal = Journal(path, {"a": 1})
    journal.append([{"index": 0}])
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{broken", lines[1]]) + "\n")
    with pytest.raises(CheckpointError, match="damaged at line 2"):
        Journal(path, {"a": 1})


def test_another_config_is_refused_unless_restarting(tmp_path):
    path = tmp_path / "j"
    Journal(path, {"eps": 0.1, "seed": 0}).append([{"index": 0}])
    with pytest.raises(CheckpointError, match="differs in: eps"):
        Journal(path, {"eps": 0.2, "seed": 0})
    fresh = Journal(path, {"eps": 0.2, "seed": 0}, restart=True)
    assert fresh.done == {} and not path.exists()  # nothing on disk until the first finished work
    fresh.append([{"index": 5}])
    assert json.loads(path.read_text().splitlines()[0])["config"] == {"eps": 0.2, "seed": 0}


def test_a_journal_without_finished_work_never_blocks_another_config(tmp_path):
    path = tmp_path / "j"
    path.write_text(json.dumps({"format": "adasmooth-journal", "config": {"attacks": ["typo"]}}) + "\n")
    assert Journal(path, {"attacks": ["pgd"]}).done == {}


def test_a_foreign_file_is_refused(tmp_path):
    path = tmp_path / "j"
    path.write_text("hello\n")
    with pytest.raises(CheckpointError, match="not an adasmooth journal"):
        Journal(path, {})


def test_shards_partition_the_indices():
    indices = list(range(11))
    parts = [shard(indices, Distributed(rank=r, world_size=3)) for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert sorted(i for p in parts for i in p) == indices


def test_single_process_context_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist = init_distributed("cpu")
    assert not dist.active and dist.is_main and dist.gather("x") == ["x"] and dist.broadcast(5) == 5
    assert dist.device("cpu") == "cpu"


def test_parts_of_several_processes_are_read_together(tmp_path):
    path = tmp_path / "out.json.journal"
    Journal(path, {"a": 1}, part="rank0").append([{"index": 0}, {"index": 2}], meta={"seconds": {"pgd": 1.0}})
    Journal(path, {"a": 1}, part="rank1").append([{"index": 1}])
    single = Journal(path, {"a": 1})  # resumed as one process
    assert sorted(single.done) == [0, 1, 2] and single.metas == [{"seconds": {"pgd": 1.0}}]
    assert len(single.files()) == 2  # the two parts; this process has written nothing yet
    single.remove_all()
    assert single.files() == []
