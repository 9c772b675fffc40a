"""`mmdiff train` with test hooks, run as a script by the resume and distributed tests (they need a real process to
SIGKILL, or two processes under torchrun). The hooks are passed to `train(..., hooks=...)` like any caller would.

    python tests/hooked_train.py [--hang-in-save-at STEP] [--param-digest-dir DIR] CONFIG [overrides ...] [--resume]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
from pathlib import Path

from mmdiff.config import load_config
from mmdiff.training.trainer import TrainerHooks, train


class TestHooks(TrainerHooks):
    def __init__(self, hang_at: int | None, digest_dir: str | None):
        self.hang_at, self.digest_dir = hang_at, digest_dir

    def during_save(self, step, partial_checkpoint, output_dir):
        if step == self.hang_at:  # block for good half-way through the save: only SIGKILL ends the process
            (Path(output_dir) / "hanging-in-save").write_text(str(step))
            threading.Event().wait()

    def after_training(self, model, rank):
        if self.digest_dir:  # a SHA-256 of this process's weights, to check that DDP kept them equal
            digest = hashlib.sha256()
            for name, tensor in sorted(model.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            Path(self.digest_dir, f"rank{rank}.txt").write_text(digest.hexdigest())


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--hang-in-save-at", type=int, default=None)
    parser.add_argument("--param-digest-dir", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    summary = train(
        load_config(args.config, args.overrides),
        resume=args.resume,
        hooks=TestHooks(args.hang_in_save_at, args.param_digest_dir),
    )
    print(json.dumps(summary, indent=1))
