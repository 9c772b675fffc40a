"""`mmdiff train`: the accelerate training loop for the shared MMDiT (docs/architecture.md, decision 11).

Stages, each skipped when its output already exists in `train.output_dir`: tokenizer, tiny VAE (unless a pretrained
one is configured), then the DiT. Checkpoints hold a sampling-ready pipeline folder with the EMA weights plus the full
training state, all safetensors + JSON, written atomically. `resume=True` (or `train.resume=auto`) continues from the
newest complete checkpoint exactly where it stopped (see `resume.py`).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from ..conditioning.text import TextConditioner
from ..config import Config, to_yaml
from ..data.dataset import make_dataloader
from ..data.latents import check_latents_match, latents_from_batch, read_latents_meta
from ..data.policies import caption_policy
from ..diffusion.process import make_image_process
from ..models.attention import set_attention_backend
from ..models.text_encoders import frozen_encoder_dim
from ..models.vae import encode_latents
from .checkpoint import (
    atomic_dir,
    checkpoint_name,
    clean_stale_temp,
    latest_checkpoint,
    prune_checkpoints,
    save_training_state,
)
from .losses import JointObjective, LossWeights
from .preflight import preflight
from .resume import (
    NonFiniteLossError,
    any_process,
    load_latest_training_state,
    skip_counts_per_process,
    step_generator,
    total_skips,
    trim_metrics,
)
from .stages import (
    build_model,
    build_pipeline,
    init_transformer_from,
    load_text_encoder,
    prepare_tokenizer,
    prepare_vae,
)
from .state import TrainerHooks, TrainState, restore_skip_counts

__all__ = [
    "Trainer",
    "TrainerHooks",
    "build_model",
    "build_pipeline",
    "get_lr_factor",
    "prepare_tokenizer",
    "prepare_vae",
    "train",
    "update_ema",
]


def get_lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to `min_ratio` (or constant)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """EMA with the usual warm-up: decay ramps as (1 + step) / (10 + step) so short runs are not stuck at init."""
    decay = min(decay, (1 + step) / (10 + step))
    for ema_p, p in zip(ema.parameters(), model.parameters(), strict=True):
        ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - decay)


def train(cfg: Config, resume: bool = False, hooks: TrainerHooks | None = None) -> dict:
    """Train the shared DiT as configured; returns a summary (steps, losses, skipped records, output folders).

    `resume` (or `train.resume=auto`) continues from the newest complete checkpoint in `train.output_dir`; without
    it, a folder that already holds checkpoints is refused rather than silently mixed with a new run. `hooks`: see
    `TrainerHooks`.
    """
    return Trainer(cfg, resume=resume, hooks=hooks).fit()


class Trainer:
    """One training run: built from the config (stages, model, optimizer, data, resumed state), then `fit()`, which
    calls `step()` until `train.max_steps` or the time budget, logging, evaluating (`evaluate()`) and checkpointing
    (`save()`) on the configured schedule. The counters that a checkpoint carries live in `self.state`."""

    def __init__(self, cfg: Config, resume: bool = False, hooks: TrainerHooks | None = None):
        preflight(cfg)
        self.cfg, self.hooks = cfg, hooks or TrainerHooks()
        resume = resume or cfg.train.resume == "auto"
        mixed = cfg.train.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if torch.cuda.is_available() else "no"
        self.out = out = Path(cfg.train.output_dir)
        self.ckpt_root = out / "checkpoints"
        # Gradient accumulation is done by hand (no_sync + one clip/step per window) so that a non-finite window can
        # be dropped as a whole, identically on every process.
        self.accelerator = accelerator = Accelerator(
            mixed_precision=mixed, log_with=list(cfg.train.trackers) or None, project_dir=str(out)
        )
        # The same seed on every process: identical initial weights and EMA; per-process randomness is
        # step_generator's.
        set_seed(cfg.train.seed)
        set_attention_backend(cfg.model.attention_backend)
        self.main, self.rank = accelerator.is_main_process, accelerator.process_index
        if not resume and latest_checkpoint(self.ckpt_root) is not None:
            raise ValueError(
                f"{out} already holds checkpoints up to {latest_checkpoint(self.ckpt_root).name}: pass --resume "
                "(or train.resume=auto) to continue that run, or choose another train.output_dir"
            )
        if self.main:
            out.mkdir(parents=True, exist_ok=True)
            for folder in (out, self.ckpt_root):
                for name in clean_stale_temp(folder):
                    print(f"removed or restored {folder / name} left by an interrupted save")
            (out / "config.yaml").write_text(to_yaml(cfg))
        accelerator.wait_for_everyone()
        self._build_model()
        self._build_optimizer()
        self.state = TrainState(skips=restore_skip_counts({}, self.rank, accelerator.num_processes))
        self.resumed_from = self._resume() if resume else None
        self.metrics_path = out / "metrics.jsonl"
        if self.main:
            trim_metrics(self.metrics_path, self.state.step if self.resumed_from is not None else None)
        objective = JointObjective(
            self.model, self.image_process, self.weights, self.tokenizer.pad_token_id, self.tokenizer.mask_token_id
        )
        self.objective, self.optimizer = accelerator.prepare(objective, self.optimizer)
        self.ema.to(accelerator.device)
        t = cfg.train
        if self.main and t.trackers:
            accelerator.init_trackers(
                "mmdiff", config={"max_steps": t.max_steps, "lr": t.lr, "batch_size": t.batch_size}
            )
        self._build_data()
        self.history: list[dict] = []
        self.last_losses: dict[str, float] = {}

    # ------------------------------------------------------------------ setup

    def _build_model(self) -> None:
        cfg, accelerator, out = self.cfg, self.accelerator, self.out
        self.tokenizer = tokenizer = prepare_tokenizer(cfg, out, accelerator)
        vae = prepare_vae(cfg, out, tokenizer, accelerator)
        self.vae = vae = vae.to(accelerator.device).requires_grad_(False).eval()
        self.latent_shape = None
        if cfg.data.latent_shards:
            # Precomputed latents replace the per-batch encode; the VAE still goes into the saved pipeline.
            meta = read_latents_meta(cfg.data.latent_shards)
            self.latent_shape = check_latents_match(
                meta, vae, cfg.data.image_size, cfg.vae.pretrained_path or str(out / "vae")
            )
        self.text_encoder, self.encoder_tokenizer = load_text_encoder(cfg, accelerator.device)
        set_seed(cfg.train.seed)  # the VAE stage ran only on the main process: re-align the RNG before model init
        frozen_dim = frozen_encoder_dim(self.text_encoder) if self.text_encoder is not None else None
        self.model = model = build_model(cfg, tokenizer, vae, frozen_dim)
        if cfg.train.init_from:
            accelerator.print(init_transformer_from(model, cfg.train.init_from))
        self.conditioner = TextConditioner(
            tokenizer, self.text_encoder, self.encoder_tokenizer, cfg.text_encoder.max_length
        )
        if cfg.model.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        if cfg.model.compile:  # after the EMA copy, which stays eager; in place, so state-dict keys do not change
            model.compile()
        d = cfg.diffusion
        self.image_process = make_image_process(d)
        self.weights = LossWeights(
            d.image_loss_weight, d.text_loss_weight, d.image_cond_drop, d.text_cond_drop, d.mask_eps
        )

    def _build_optimizer(self) -> None:
        t = self.cfg.train
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay
        )
        # Not passed through accelerator.prepare: accelerate would step it once per process per step, and the
        # schedule here is defined in optimizer steps.
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: get_lr_factor(s, t.warmup_steps, t.max_steps, t.lr_schedule, t.min_lr_ratio)
        )

    def _resume(self) -> Path | None:
        """Load the newest complete checkpoint (weights, EMA, optimizer, schedule, state); None without one."""
        t, accelerator, optimizer, lr_scheduler = self.cfg.train, self.accelerator, self.optimizer, self.lr_scheduler
        extra, resumed_from = load_latest_training_state(
            self.ckpt_root, self.model, self.ema, optimizer, accelerator.print
        )
        if extra is None:
            accelerator.print(f"no complete checkpoint in {self.ckpt_root}: starting from step 0")
            return None
        lr_scheduler.load_state_dict(extra["lr_scheduler"])
        self.state = TrainState.from_checkpoint(extra, self.rank, accelerator.num_processes, t.grad_accum_steps)
        step = self.state.step
        if lr_scheduler.base_lrs != [t.lr] * len(optimizer.param_groups):
            # the saved scheduler carries the old peak rate and would silently override train.lr: apply the
            # config's, on the (possibly also changed) schedule at the resumed step
            accelerator.print(f"train.lr is {t.lr} (the checkpoint ran at {lr_scheduler.base_lrs[0]}): using {t.lr}")
            lr_scheduler.base_lrs = [t.lr] * len(optimizer.param_groups)
            for group, factor in zip(optimizer.param_groups, lr_scheduler.lr_lambdas, strict=True):
                group["initial_lr"] = t.lr
                group["lr"] = t.lr * factor(step)  # already for the first resumed step
        if extra.get("num_processes", 1) != accelerator.num_processes:
            accelerator.print(
                f"warning: {resumed_from} was written by {extra.get('num_processes', 1)} process(es), this run "
                f"has {accelerator.num_processes}: the data order differs from an uninterrupted run"
            )
        accelerator.print(f"resumed from {resumed_from} at step {step}")
        return resumed_from

    def _build_data(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        # The loader splits shards by process and worker itself, so it is not passed through accelerator.prepare; it
        # is a pure function of the seed and starts after the batches this process consumed before the checkpoint.
        self.loader = make_dataloader(
            cfg.data.latent_shards or cfg.data.train_shards,
            self.tokenizer,
            cfg.data.image_size,
            cfg.data.max_length,
            t.batch_size,
            num_workers=cfg.data.num_workers,
            seed=t.seed,
            shuffle_buffer=cfg.data.shuffle_buffer,
            caption_policy=caption_policy(cfg.data),
            skip_batches=self.state.batches_consumed,
            latent_shape=self.latent_shape,
        )
        self.eval_batch = None
        if cfg.data.val_shards:
            self.eval_batch = next(
                iter(
                    make_dataloader(
                        cfg.data.val_shards,
                        self.tokenizer,
                        cfg.data.image_size,
                        cfg.data.max_length,
                        min(t.batch_size, 128),
                        seed=0,
                        repeat=False,
                        shuffle_buffer=0,
                        caption_policy=caption_policy(cfg.data, caption_choice="txt"),
                        drop_last=False,
                    )
                )
            )
        self.live_eval = None
        if t.eval_encoder and self.main:
            if not cfg.data.val_shards:
                raise ValueError("train.eval_encoder needs data.val_shards: the evaluation draws its prompts from them")
            self.live_eval = self.hooks.make_evaluator(cfg, str(self.accelerator.device))
            if self.live_eval is None:
                raise ValueError(
                    "train.eval_encoder is evaluated by mmdiff's evaluation harness: run `mmdiff train`, or pass "
                    "hooks=mmdiff.eval.in_training.TrainingEvalHooks() to train()"
                )

    # ------------------------------------------------------------------ work

    def pipeline(self):
        """A sampling pipeline around the EMA weights (what a checkpoint saves)."""
        return build_pipeline(
            self.ema,
            self.vae,
            self.image_process.sampling_scheduler(),
            self.tokenizer,
            self.text_encoder,
            self.encoder_tokenizer,
            training_config=self.cfg,
        )

    def losses(self, batch: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The objective on one batch; every random draw comes from `generator`."""
        device = self.accelerator.device
        ids = batch["input_ids"].to(device)
        frozen_text = None
        sample = self.cfg.vae.sample_posterior
        with torch.no_grad():
            if "latents" in batch:
                latents = latents_from_batch(batch, device, generator, sample)
            else:
                pixels = batch["pixel_values"].to(device, self.vae.dtype)
                latents = encode_latents(self.vae, pixels, generator=generator, sample=sample).float()
            if self.conditioner.frozen:
                frozen_text = self.conditioner.frozen_hidden(batch["captions"], device)
        text_task_ids = batch["target_ids"].to(device)  # the caption policy's image -> text targets
        return self.objective(latents, ids, frozen_text, generator, text_task_ids)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Losses on the fixed validation batch, and the in-training metrics of the EMA weights when configured."""
        if self.eval_batch is None:
            return {}
        self.objective.eval()
        with self.accelerator.autocast():
            losses = self.losses(self.eval_batch, torch.Generator(self.accelerator.device).manual_seed(1234))
        record = {"eval_loss_image": float(losses["loss_image"]), "eval_loss_text": float(losses["loss_text"])}
        if self.live_eval is not None:  # the main process only: generation and metrics of the EMA weights
            record.update(self.live_eval(self.pipeline()))
        self.objective.train()
        return record

    def log(self, record: dict) -> None:
        self.history.append(record)
        if self.main:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            if self.cfg.train.trackers:
                values = {k: v for k, v in record.items() if isinstance(v, int | float)}
                self.accelerator.log(values, step=record["step"])

    def save(self, final: bool = False) -> Path | None:
        """Write checkpoint `step` atomically (and, when `final`, the run's pipeline folder); every process takes
        part (the skip counts are gathered), only the main process writes."""
        per_process = skip_counts_per_process(self.accelerator, self.state.skips)
        self.accelerator.wait_for_everyone()
        if not self.main:
            return None
        cfg, step = self.cfg, self.state.step
        pipe = self.pipeline()
        target = self.ckpt_root / checkpoint_name(step)
        with atomic_dir(target) as tmp:
            extra = self.state.to_checkpoint(self.lr_scheduler, per_process)
            save_training_state(tmp / "training_state", self.model, self.ema, self.optimizer, extra)
            self.hooks.during_save(step, tmp, self.out)
            pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
            (tmp / "pipeline" / "mmdiff_config.yaml").write_text(to_yaml(cfg))
            (tmp / "config.yaml").write_text(to_yaml(cfg))
        prune_checkpoints(self.ckpt_root, cfg.train.keep_checkpoints)
        if final:
            with atomic_dir(self.out / "pipeline") as tmp:
                pipe.save_pretrained(tmp, safe_serialization=True)
                (tmp / "mmdiff_config.yaml").write_text(to_yaml(cfg))
        return target

    def step(self, data_iter) -> tuple[bool, int, torch.Tensor]:
        """One optimizer step over `train.grad_accum_steps` micro-batches from `data_iter`.

        Returns (taken, images, grad norm): a window with a non-finite loss or gradient is dropped as a whole on
        every process (`train.on_nonfinite=skip`) or stops the run (`stop`, NonFiniteLossError).
        """
        t, accelerator, state = self.cfg.train, self.accelerator, self.state
        nonfinite_loss, step_images = False, 0
        for micro in range(t.grad_accum_steps):
            batch = next(data_iter)
            state.batches_consumed += 1
            state.skips.accumulate(batch["skips"])
            generator = step_generator(t.seed, self.rank, state.batches_consumed, accelerator.device)
            # Gradients are all-reduced only on the window's last micro-batch.
            last = micro == t.grad_accum_steps - 1
            sync = contextlib.nullcontext() if last else accelerator.no_sync(self.objective)
            with sync:
                with accelerator.autocast():
                    losses = self.losses(batch, generator)
                nonfinite_loss |= not bool(torch.isfinite(losses["loss"]))
                # Backward even on a NaN: DDP expects it after every forward; the gradients are dropped below.
                accelerator.backward(losses["loss"] / t.grad_accum_steps)
            step_images += batch["input_ids"].shape[0] * accelerator.num_processes
        grad_norm = accelerator.clip_grad_norm_(self.objective.parameters(), t.grad_clip)
        self.last_losses = {"loss_image": float(losses["loss_image"]), "loss_text": float(losses["loss_text"])}
        if any_process(accelerator, nonfinite_loss) or not bool(torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            where = (
                f"non-finite loss at step {state.step + 1} (image {self.last_losses['loss_image']}, text "
                f"{self.last_losses['loss_text']}, grad norm {float(grad_norm)})"
            )
            if t.on_nonfinite == "stop":
                kept = latest_checkpoint(self.ckpt_root)
                raise NonFiniteLossError(
                    f"{where}: training stopped; the last good checkpoint is {kept or 'none (no checkpoint yet)'}. "
                    "Resume with --resume after lowering train.lr, or set train.on_nonfinite=skip to skip such batches"
                )
            state.nonfinite_skipped += 1
            accelerator.print(f"{where}: batch skipped ({state.nonfinite_skipped} so far)")
            return False, step_images, grad_norm
        self.optimizer.step()
        if not self.optimizer.step_was_skipped:  # fp16 loss scaling skips steps with overflowing gradients
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_ema(self.ema, self.model, t.ema_decay, state.step)
        state.step += 1
        state.images_seen += step_images
        return True, step_images, grad_norm

    def fit(self) -> dict:
        """Train to `train.max_steps` (or the time budget), then save the final checkpoint and pipeline folder."""
        t, accelerator, state = self.cfg.train, self.accelerator, self.state
        if self.resumed_from is None:
            self.log({"step": state.step, **self.evaluate()})
        self.objective.train()
        started = time.time()
        window_start, window_images = time.time(), 0
        progress = tqdm(total=t.max_steps, initial=state.step, disable=not self.main, desc="train", dynamic_ncols=True)
        data_iter = iter(self.loader)
        while state.step < t.max_steps:
            taken, images, grad_norm = self.step(data_iter)
            if not taken:
                continue
            window_images += images
            progress.update()
            losses = self.last_losses
            progress.set_postfix(img=f"{losses['loss_image']:.4f}", txt=f"{losses['loss_text']:.3f}")
            # Every process must agree, or one would wait in save() for the others forever.
            out_of_time = t.max_minutes is not None and any_process(
                accelerator, (time.time() - started) > 60 * t.max_minutes
            )
            step = state.step
            if step % t.log_every == 0 or step == t.max_steps or out_of_time:
                elapsed = max(time.time() - window_start, 1e-9)
                record = {
                    "step": step,
                    **losses,
                    "lr": self.lr_scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "images_per_s": window_images / elapsed,
                    "skipped": state.skips.total,
                    "nonfinite_skipped": state.nonfinite_skipped,
                }
                if step % t.eval_every == 0 or step == t.max_steps or out_of_time:
                    record.update(self.evaluate())
                self.log(record)
                window_start, window_images = time.time(), 0
            if step % t.checkpoint_every == 0 and step < t.max_steps and not out_of_time:
                self.save()
            if out_of_time:
                accelerator.print(f"stopping at step {step}: the {t.max_minutes}-minute budget is spent")
                break
        progress.close()
        final_ckpt = self.save(final=True)
        skip_totals = total_skips(skip_counts_per_process(accelerator, state.skips))
        self.hooks.after_training(self.model, self.rank)
        return self._finish(started, skip_totals, final_ckpt)

    def _finish(self, started: float, skip_totals: dict[str, int], final_ckpt: Path | None) -> dict:
        accelerator, state = self.accelerator, self.state
        evals = [r for r in self.history if "eval_loss_image" in r]
        summary = {
            "steps": state.step,
            "images_seen": state.images_seen,
            "minutes": (time.time() - started) / 60,
            "first_eval": evals[0] if evals else None,
            "last_eval": evals[-1] if evals else None,
            "last_losses": self.last_losses,
            "skips": skip_totals,
            "nonfinite_skipped": state.nonfinite_skipped,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "num_processes": accelerator.num_processes,
            "pipeline": str(self.out / "pipeline"),
            "checkpoint": str(final_ckpt) if final_ckpt else None,
        }
        if self.main:
            kinds = ", ".join(f"{k}={n}" for k, n in skip_totals.items()) or "none"
            accelerator.print(
                f"done at step {state.step}: skipped records: {kinds}; "
                f"non-finite batches skipped: {state.nonfinite_skipped}"
            )
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        self._shut_down()
        return summary

    def _shut_down(self) -> None:
        """Stop the trackers and tear the process group down on every process together. The DDP wrapper holds the
        group, so it is released first: else the real teardown came when the Trainer was freed, at different times
        per process, and gloo could hang a process whose peer had already exited."""
        accelerator = self.accelerator
        self.objective = accelerator.unwrap_model(self.objective)
        accelerator.free_memory()  # drops accelerate's own references to the prepared model and optimizer
        gc.collect()
        accelerator.wait_for_everyone()
        # On every process: it finishes the trackers (main's only) and, in recent accelerate, destroys the group.
        accelerator.end_training()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
