"""Crash and resume with real processes: SIGKILL at an arbitrary step and in the middle of a checkpoint save.

Each run is a real `python -m mmdiff.cli train` subprocess on the tiny setup (seconds on one CPU thread). The
property: kill + `--resume` ends with the same weights, EMA and per-step losses as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import HOOKED_TRAIN, stage_run_dir, tiny_train_overrides
from safetensors.torch import load_file

from mmdiff.training.checkpoint import latest_checkpoint, list_checkpoints

MAX_STEPS = 10
TRAIN = {"max_steps": MAX_STEPS, "checkpoint_every": 3, "data.num_workers": 2}
DEADLINE_S = 120  # generous: a deadline for a poll loop, not a timing assumption


def _start(setup, run_dir: Path, resume: bool = False, hang_at: int | None = None, **train) -> subprocess.Popen:
    config = run_dir.parent / "empty.yaml"  # everything comes from overrides on top of the schema defaults
    config.write_text("{}\n")
    # the user's command; with a hook, the same training through `train(..., hooks=...)` (tests/hooked_train.py)
    entry = [str(HOOKED_TRAIN), "--hang-in-save-at", str(hang_at)] if hang_at else ["-m", "mmdiff.cli", "train"]
    cmd = [sys.executable, *entry, str(config)]
    cmd += tiny_train_overrides(setup, run_dir, **{**TRAIN, **train})
    if resume:
        cmd.append("--resume")
    child_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env)


def _finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 0, output[-3000:]
    return output


def _wait_for(predicate, proc: subprocess.Popen) -> None:
    """Poll the file system until `predicate()` holds; fail if the process ends first or the deadline passes."""
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < deadline, "deadline passed while waiting for the kill point"
        try:  # wait on the child itself between looks at the files: returns at once if it ends
            proc.wait(timeout=0.01)
        except subprocess.TimeoutExpired:
            continue
        if not predicate():
            pytest.fail(f"training ended before the kill point:\n{proc.stdout.read()[-3000:]}")


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == -signal.SIGKILL


def _logged_steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return records


def _final_state(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    folder = run_dir / "checkpoints" / f"step-{MAX_STEPS:08d}" / "training_state"
    return {name: load_file(folder / f"{name}.safetensors") for name in ("model", "ema", "optimizer")}


def _max_abs_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            worst = max(worst, (a[name][key].double() - b[name][key].double()).abs().max().item())
    return worst


@pytest.fixture(scope="module")
def reference_run(tiny_train_setup, tmp_path_factory) -> Path:
    """The uninterrupted run, in this process (saves an interpreter start) with the children's thread count."""
    from mmdiff.config import load_config
    from mmdiff.training.trainer import train

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    stage_run_dir(tiny_train_setup, run_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config(None, tiny_train_overrides(tiny_train_setup, run_dir, **TRAIN)))
    finally:
        torch.set_num_threads(threads)
    return run_dir


def _assert_same_as_reference(run_dir: Path, reference: Path) -> float:
    diff = _max_abs_diff(_final_state(run_dir), _final_state(reference))
    print(f"max abs difference to the uninterrupted run: {diff:.3g}")
    assert diff < 1e-6
    # every step logged exactly once, with the very same losses as the uninterrupted run
    got = {r["step"]: r for r in _logged_steps(run_dir)}
    want = {r["step"]: r for r in _logged_steps(reference)}
    assert sorted(got) == list(range(MAX_STEPS + 1)) == [r["step"] for r in _logged_steps(run_dir)]
    for step in range(1, MAX_STEPS + 1):
        assert abs(got[step]["loss_image"] - want[step]["loss_image"]) < 1e-6, step
        assert abs(got[step]["loss_text"] - want[step]["loss_text"]) < 1e-6, step
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == MAX_STEPS and summary["images_seen"] == MAX_STEPS * 4
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step-00000009", "step-00000010"]
    return diff


def test_sigkill_at_a_random_step_then_resume_matches_uninterrupted_run(tiny_train_setup, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    stage_run_dir(tiny_train_setup, run_dir)
    kill_after = random.Random(5).randint(4, 7)  # not a checkpoint boundary in general; the kill lands later still
    proc = _start(tiny_train_setup, run_dir)
    _wait_for(lambda: any(r.get("step", 0) >= kill_after for r in _logged_steps(run_dir)), proc)
    _kill(proc)
    killed_at = max(r["step"] for r in _logged_steps(run_dir))
    assert killed_at < MAX_STEPS
    resumed_from = latest_checkpoint(run_dir / "checkpoints")
    assert resumed_from is not None

    output = _finish(_start(tiny_train_setup, run_dir, resume=True))
    assert f"resumed from {resumed_from}" in output
    _assert_same_as_reference(run_dir, reference_run)


def test_sigkill_during_checkpoint_save_keeps_previous_checkpoint(tiny_train_setup, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    stage_run_dir(tiny_train_setup, run_dir)
    # All runs use two DataLoader workers: the resumed data stream must be exact with workers too.
    proc = _start(tiny_train_setup, run_dir, hang_at=6)
    _wait_for(lambda: (run_dir / "hanging-in-save").is_file(), proc)
    _kill(proc)

    ckpts = run_dir / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-00000003"]
    (partial,) = [p for p in ckpts.iterdir() if p.name.startswith(".step-00000006.tmp-")]
    assert (partial / "training_state" / "model.safetensors").is_file()
    assert not (partial / "pipeline").exists()  # the kill came half-way through the save
    state = json.loads((ckpts / "step-00000003" / "training_state" / "state.json").read_text())
    assert state["step"] == 3 and (ckpts / "step-00000003" / "pipeline" / "model_index.json").is_file()

    output = _finish(_start(tiny_train_setup, run_dir, resume=True))
    assert f"resumed from {ckpts / 'step-00000003'}" in output
    assert not partial.exists()  # stale temporary folder cleaned up on start
    _assert_same_as_reference(run_dir, reference_run)


def test_fresh_start_refuses_a_folder_with_checkpoints(tiny_train_setup, reference_run):
    from mmdiff.config import load_config
    from mmdiff.training.trainer import train

    cfg = load_config(None, tiny_train_overrides(tiny_train_setup, reference_run, **TRAIN))
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume"):
        train(cfg)


def test_resume_applies_a_changed_lr_and_schedule(tiny_train_setup, reference_run, tmp_path):
    # continuing a finished run with a longer schedule and another peak rate (as the shipped model's second run did):
    # the resumed steps must use the config's train.lr on the new schedule, not the checkpoint's old rate
    import shutil

    from mmdiff.config import load_config
    from mmdiff.training.trainer import get_lr_factor, train

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    overrides = {**TRAIN, "max_steps": MAX_STEPS + 2, "lr": 3e-4, "data.num_workers": 0}
    cfg = load_config(None, tiny_train_overrides(tiny_train_setup, run_dir, **overrides))
    train(cfg, resume=True)
    logged = {r["step"]: r["lr"] for r in _logged_steps(run_dir) if "lr" in r}
    for step in (MAX_STEPS + 1, MAX_STEPS + 2):
        want = 3e-4 * get_lr_factor(step, cfg.train.warmup_steps, MAX_STEPS + 2, "cosine", cfg.train.min_lr_ratio)
        assert abs(logged[step] - want) < 1e-12, (step, logged[step], want)
