"""Workspace file writes (issue 26 item 12): concurrent writers of one JSON file never collide, and
files honour the umask (a VPTQ_HOME shared by a group of workers stays readable to the group)."""

from __future__ import annotations

import json
import os
import threading

import torch
from vptq_service.tasks.workspace import save_tensors, write_json


def test_concurrent_write_json_of_one_path_never_collides(tmp_path):
    path = tmp_path / "state.json"
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for j in range(30):
                write_json({"writer": i, "n": j, "pad": "x" * 2000}, path)
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads(path.read_text())["n"] == 29  # whole, from one writer's last write
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left behind


def test_workspace_files_honour_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        j = write_json({"a": 1}, tmp_path / "a.json")
        t = save_tensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert [(p.stat().st_mode & 0o777) for p in (j, t)] == [0o664, 0o664]
