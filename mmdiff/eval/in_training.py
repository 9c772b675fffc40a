"""A small generic evaluation that `mmdiff train` runs every `train.eval_every` steps (with `train.eval_encoder`).

The EMA weights sample `train.eval_images` images for the prompts of the first validation records (image i from
seed `train.seed + i`, the same every time, so the curve shows the model, not the noise), and their FD to the real
images of the same records, KID, CLIP score and R-precision are taken in the eval encoder's space. The figures go to
`metrics.jsonl` and the trackers as `eval_fd`, `eval_kid`, `eval_clip_score`, `eval_r_precision`;
`mmdiff plot RUN_DIR` draws them against the step. The training core reaches it only through the hooks `mmdiff
train` passes (`TrainingEvalHooks`), so the library does not import the evaluation lab.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..training.state import TrainerHooks
from .features.spaces import resolve_encoders
from .generic import image_space_metrics
from .records import load_eval_records, require_records
from .run import generate_images


class TrainingEvaluator:
    """Holds the encoder, the validation prompts and the real features between evaluations."""

    def __init__(
        self,
        encoder_dir: str | os.PathLike,
        val_shards: str | list[str],
        image_size: int,
        num_images: int = 256,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        seed: int = 0,
        batch_size: int = 64,
        device: str = "cpu",
    ) -> None:
        self.records = load_eval_records(val_shards, num_images)
        require_records(self.records, 2, "train.eval_encoder (FD needs 2 images)")
        spaces, _ = resolve_encoders(
            encoder_dir, None, None, None, device, image_size, self.records.images, self.records.prompts
        )
        self.encoder = spaces["eval_encoder"]
        self.real_features = self.encoder.image_features(self.records.images)
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.batch_size = batch_size

    def __call__(self, pipe) -> dict[str, Any]:
        """The figures for the pipeline's current weights, keys prefixed with `eval_`."""
        started = time.time()
        pipe.set_progress_bar_config(disable=True)
        images = generate_images(
            pipe, self.records.prompts, self.guidance_scale, self.num_inference_steps, self.seed, self.batch_size
        )
        figures = image_space_metrics(
            self.encoder, images, self.records.images, self.records.prompts, seed=self.seed,
            real_features=self.real_features,
        )  # fmt: skip
        keep = ("fd", "kid", "clip_score", "r_precision", "precision", "recall")
        out = {f"eval_{k}": float(figures[k]) for k in keep if k in figures}
        out["eval_seconds"] = round(time.time() - started, 2)
        return out


class TrainingEvalHooks(TrainerHooks):
    """Training hooks that add the evaluation `train.eval_encoder` asks for (what `mmdiff train` passes)."""

    def make_evaluator(self, cfg, device: str) -> TrainingEvaluator:
        t = cfg.train
        return TrainingEvaluator(
            t.eval_encoder,
            cfg.data.val_shards,
            cfg.data.image_size,
            num_images=t.eval_images,
            num_inference_steps=t.eval_sampling_steps,
            guidance_scale=cfg.sample.guidance_scale,
            seed=t.seed,
            batch_size=min(t.batch_size, 128),
            device=device,
        )
