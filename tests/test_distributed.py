"""Two training processes on the CPU (gloo): synchronised weights, rank-0-only outputs, and a 2-process resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import HOOKED_TRAIN, stage_run_dir, tiny_train_overrides

from mmdiff.training.checkpoint import list_checkpoints


def _torchrun(setup, run_dir, digest_dir, resume: bool, max_steps: int) -> str:
    """`torchrun --standalone --nproc_per_node 2 -m mmdiff.cli train ...` (what `accelerate launch` does on one
    machine); --standalone picks a free rendezvous port, so parallel test runs do not collide."""
    digest_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir.parent / "empty.yaml"
    config.write_text("{}\n")
    overrides = tiny_train_overrides(setup, run_dir, max_steps=max_steps, checkpoint_every=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(HOOKED_TRAIN), "--param-digest-dir", str(digest_dir), str(config), *overrides]
    cmd += ["--resume"] if resume else []
    # ACCELERATE_USE_CPU is what `accelerate launch --cpu` sets: accelerate then uses gloo across CPU processes.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def test_two_processes_train_in_sync_and_resume(tiny_train_setup, tmp_path):
    run_dir = tmp_path / "run"
    stage_run_dir(tiny_train_setup, run_dir)
    _torchrun(tiny_train_setup, run_dir, tmp_path / "digest1", resume=False, max_steps=3)
    digests = [(tmp_path / "digest1" / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]  # gradients were all-reduced: both processes hold the same weights

    # only rank 0 logs and checkpoints: every step appears once, the summary counts both processes' images
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["images_seen"] == 3 * 4 * 2
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step-00000002", "step-00000003"]

    output = _torchrun(tiny_train_setup, run_dir, tmp_path / "digest2", resume=True, max_steps=5)
    assert "resumed from" in output and "step-00000003" in output
    digests = [(tmp_path / "digest2" / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5]
    assert json.loads((run_dir / "summary.json").read_text())["images_seen"] == 5 * 4 * 2
