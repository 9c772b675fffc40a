"""`mmdiff train`: the accelerate training loop for the shared MMDiT (DESIGN.md, decision 11).

Stages, each skipped when its output already exists in `train.output_dir`: tokenizer, tiny VAE (unless a pretrained
one is configured), then the DiT. Checkpoints hold a sampling-ready pipeline folder with the EMA weights plus the full
training state, all safetensors + JSON, written atomically. `resume=True` (or `train.resume=auto`) continues from the
newest complete checkpoint exactly where it stopped (see `resume.py`).
"""

from __future__ import annotations

import contextlib
import copy
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
from ..data.shards import SKIP_REASONS
from ..diffusion.gaussian import make_noise_scheduler
from ..models.attention import set_attention_backend
from ..models.text_encoders import (
    frozen_encoder_dim,
    load_frozen_text_encoder,
)
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
    maybe_hang_in_save,
    maybe_write_param_digest,
    restore_skip_counts,
    skip_counts_per_process,
    step_generator,
    total_skips,
    trim_metrics,
)
from .stages import build_model, build_pipeline, prepare_tokenizer, prepare_vae

__all__ = ["build_model", "build_pipeline", "get_lr_factor", "prepare_tokenizer", "prepare_vae", "train", "update_ema"]


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


def train(cfg: Config, resume: bool = False) -> dict:
    """Train the shared DiT as configured; returns a summary (steps, losses, skipped records, output folders).

    `resume` (or `train.resume=auto`) continues from the newest complete checkpoint in `train.output_dir`; without
    it, a folder that already holds checkpoints is refused rather than silently mixed with a new run.
    """
    preflight(cfg)
    resume = resume or cfg.train.resume == "auto"
    mixed = cfg.train.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    out = Path(cfg.train.output_dir)
    ckpt_root = out / "checkpoints"
    # Gradient accumulation is done by hand (no_sync + one clip/step per window) so that a non-finite window can be
    # dropped as a whole, identically on every process.
    accelerator = Accelerator(mixed_precision=mixed, log_with=list(cfg.train.trackers) or None, project_dir=str(out))
    # The same seed on every process: identical initial weights and EMA; per-process randomness is step_generator's.
    set_seed(cfg.train.seed)
    set_attention_backend(cfg.model.attention_backend)
    main, rank = accelerator.is_main_process, accelerator.process_index
    if not resume and latest_checkpoint(ckpt_root) is not None:
        raise ValueError(
            f"{out} already holds checkpoints up to {latest_checkpoint(ckpt_root).name}: pass --resume "
            "(or train.resume=auto) to continue that run, or choose another train.output_dir"
        )
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for folder in (out, ckpt_root):
            for name in clean_stale_temp(folder):
                print(f"removed or restored {folder / name} left by an interrupted save")
        (out / "config.yaml").write_text(to_yaml(cfg))
    accelerator.wait_for_everyone()

    tokenizer = prepare_tokenizer(cfg, out, accelerator)
    vae = prepare_vae(cfg, out, tokenizer, accelerator).to(accelerator.device).requires_grad_(False).eval()
    latent_shape = None
    if cfg.data.latent_shards:
        # Precomputed latents replace the per-batch encode; the VAE still goes into the saved pipeline.
        meta = read_latents_meta(cfg.data.latent_shards)
        latent_shape = check_latents_match(meta, vae, cfg.data.image_size, cfg.vae.pretrained_path or str(out / "vae"))
    text_encoder = encoder_tokenizer = None
    if cfg.text_encoder.kind != "joint":
        text_encoder, encoder_tokenizer = load_frozen_text_encoder(cfg.text_encoder.kind, cfg.text_encoder.path)
        text_encoder.to(accelerator.device)
    set_seed(cfg.train.seed)  # the VAE stage ran only on the main process: re-align the RNG before model init
    model = build_model(cfg, tokenizer, vae, frozen_encoder_dim(text_encoder) if text_encoder is not None else None)
    conditioner = TextConditioner(tokenizer, text_encoder, encoder_tokenizer, cfg.text_encoder.max_length)
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if cfg.model.compile:  # after the EMA copy, which stays eager; in place, so state-dict keys do not change
        model.compile()
    noise_scheduler = make_noise_scheduler(
        {
            "num_train_timesteps": cfg.diffusion.num_train_timesteps,
            "beta_schedule": cfg.diffusion.beta_schedule,
            "prediction_type": cfg.diffusion.prediction_type,
            "clip_sample": False,
        }
    )
    weights = LossWeights(
        cfg.diffusion.image_loss_weight,
        cfg.diffusion.text_loss_weight,
        cfg.diffusion.image_cond_drop,
        cfg.diffusion.text_cond_drop,
        cfg.diffusion.mask_eps,
    )
    t = cfg.train
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay
    )
    # Not passed through accelerator.prepare: accelerate would step it once per process per step, and the
    # schedule here is defined in optimizer steps.
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: get_lr_factor(s, t.warmup_steps, t.max_steps, t.lr_schedule, t.min_lr_ratio)
    )

    step = batches_consumed = images_seen = nonfinite_skipped = 0
    skips = restore_skip_counts({}, rank, accelerator.num_processes)
    resumed_from = None
    if resume:
        extra, resumed_from = load_latest_training_state(ckpt_root, model, ema, optimizer, accelerator.print)
        if extra is None:
            accelerator.print(f"no complete checkpoint in {ckpt_root}: starting from step 0")
        else:
            lr_scheduler.load_state_dict(extra["lr_scheduler"])
            step, batches_consumed = extra["step"], extra.get("batches_consumed", extra["step"] * t.grad_accum_steps)
            if lr_scheduler.base_lrs != [t.lr] * len(optimizer.param_groups):
                # the saved scheduler carries the old peak rate and would silently override train.lr: apply the
                # config's, on the (possibly also changed) schedule at the resumed step
                accelerator.print(
                    f"train.lr is {t.lr} (the checkpoint ran at {lr_scheduler.base_lrs[0]}): using {t.lr}"
                )
                lr_scheduler.base_lrs = [t.lr] * len(optimizer.param_groups)
                for group, factor in zip(optimizer.param_groups, lr_scheduler.lr_lambdas, strict=True):
                    group["initial_lr"] = t.lr
                    group["lr"] = t.lr * factor(step)  # already for the first resumed step
            images_seen, nonfinite_skipped = extra.get("images_seen", 0), extra.get("nonfinite_skipped", 0)
            skips = restore_skip_counts(extra, rank, accelerator.num_processes)
            if extra.get("num_processes", 1) != accelerator.num_processes:
                accelerator.print(
                    f"warning: {resumed_from} was written by {extra.get('num_processes', 1)} process(es), this run "
                    f"has {accelerator.num_processes}: the data order differs from an uninterrupted run"
                )
            accelerator.print(f"resumed from {resumed_from} at step {step}")
    metrics_path = out / "metrics.jsonl"
    if main:
        trim_metrics(metrics_path, step if resumed_from is not None else None)
    objective = JointObjective(model, noise_scheduler, weights, tokenizer.pad_token_id, tokenizer.mask_token_id)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    ema.to(accelerator.device)
    if main and t.trackers:
        accelerator.init_trackers("mmdiff", config={"max_steps": t.max_steps, "lr": t.lr, "batch_size": t.batch_size})

    # The loader splits shards by process and worker itself, so it is not passed through accelerator.prepare; it is
    # a pure function of the seed and starts after the batches this process consumed before the checkpoint.
    loader = make_dataloader(
        cfg.data.latent_shards or cfg.data.train_shards,
        tokenizer,
        cfg.data.image_size,
        cfg.data.max_length,
        t.batch_size,
        num_workers=cfg.data.num_workers,
        seed=t.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        caption_policy=caption_policy(cfg.data),
        skip_batches=batches_consumed,
        latent_shape=latent_shape,
    )
    eval_batch = None
    if cfg.data.val_shards:
        eval_batch = next(
            iter(
                make_dataloader(
                    cfg.data.val_shards,
                    tokenizer,
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

    live_eval = None
    if t.eval_encoder and main:
        if not cfg.data.val_shards:
            raise ValueError("train.eval_encoder needs data.val_shards: the evaluation draws its prompts from them")
        from mmdiff.eval.in_training import TrainingEvaluator

        live_eval = TrainingEvaluator(
            t.eval_encoder,
            cfg.data.val_shards,
            cfg.data.image_size,
            num_images=t.eval_images,
            num_inference_steps=t.eval_sampling_steps,
            guidance_scale=cfg.sample.guidance_scale,
            seed=t.seed,
            batch_size=min(t.batch_size, 128),
            device=str(accelerator.device),
        )

    def losses_for(batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        ids = batch["input_ids"].to(accelerator.device)
        frozen_text = None
        sample = cfg.vae.sample_posterior
        with torch.no_grad():
            if "latents" in batch:
                latents = latents_from_batch(batch, accelerator.device, generator, sample)
            else:
                pixels = batch["pixel_values"].to(accelerator.device, vae.dtype)
                latents = encode_latents(vae, pixels, generator=generator, sample=sample).float()
            if conditioner.frozen:
                frozen_text = conditioner.frozen_hidden(batch["captions"], accelerator.device)
        text_task_ids = batch["target_ids"].to(accelerator.device)  # the caption policy's image -> text targets
        return objective(latents, ids, frozen_text, generator, text_task_ids)

    @torch.no_grad()
    def evaluate() -> dict:
        if eval_batch is None:
            return {}
        objective.eval()
        with accelerator.autocast():
            losses = losses_for(eval_batch, torch.Generator(accelerator.device).manual_seed(1234))
        record = {"eval_loss_image": float(losses["loss_image"]), "eval_loss_text": float(losses["loss_text"])}
        if live_eval is not None:  # the main process only: generation and metrics of the EMA weights
            record.update(
                live_eval(build_pipeline(ema, vae, noise_scheduler, tokenizer, text_encoder, encoder_tokenizer))
            )
        objective.train()
        return record

    history: list[dict] = []

    def log(record: dict) -> None:
        history.append(record)
        if main:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            if t.trackers:
                accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def save(final: bool = False) -> Path | None:
        # Every process takes part: the skip counts are gathered, then only the main process writes.
        per_process = skip_counts_per_process(accelerator, skips)
        accelerator.wait_for_everyone()
        if not main:
            return None
        pipe = build_pipeline(ema, vae, noise_scheduler, tokenizer, text_encoder, encoder_tokenizer)
        target = ckpt_root / checkpoint_name(step)
        extra = {
            "step": step,
            "lr_scheduler": lr_scheduler.state_dict(),
            "batches_consumed": batches_consumed,
            "images_seen": images_seen,
            "nonfinite_skipped": nonfinite_skipped,
            "num_processes": accelerator.num_processes,
            "skip_reasons": list(SKIP_REASONS),
            "skips_per_process": per_process,
        }
        with atomic_dir(target) as tmp:
            save_training_state(tmp / "training_state", model, ema, optimizer, extra)
            maybe_hang_in_save(step, out)
            pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
            (tmp / "pipeline" / "mmdiff_config.yaml").write_text(to_yaml(cfg))
            (tmp / "config.yaml").write_text(to_yaml(cfg))
        prune_checkpoints(ckpt_root, t.keep_checkpoints)
        if final:
            with atomic_dir(out / "pipeline") as tmp:
                pipe.save_pretrained(tmp, safe_serialization=True)
                (tmp / "mmdiff_config.yaml").write_text(to_yaml(cfg))
        return target

    if resumed_from is None:
        log({"step": step, **evaluate()})
    objective.train()
    started = time.time()
    window_start, window_images = time.time(), 0
    progress = tqdm(total=t.max_steps, initial=step, disable=not main, desc="train", dynamic_ncols=True)
    data_iter = iter(loader)
    last_losses: dict[str, float] = {}
    while step < t.max_steps:
        nonfinite_loss, step_images = False, 0
        for micro in range(t.grad_accum_steps):
            batch = next(data_iter)
            batches_consumed += 1
            skips.accumulate(batch["skips"])
            generator = step_generator(t.seed, rank, batches_consumed, accelerator.device)
            # Gradients are all-reduced only on the window's last micro-batch.
            sync = contextlib.nullcontext() if micro == t.grad_accum_steps - 1 else accelerator.no_sync(objective)
            with sync:
                with accelerator.autocast():
                    losses = losses_for(batch, generator)
                nonfinite_loss |= not bool(torch.isfinite(losses["loss"]))
                # Backward even on a NaN: DDP expects it after every forward; the gradients are dropped below.
                accelerator.backward(losses["loss"] / t.grad_accum_steps)
            step_images += batch["input_ids"].shape[0] * accelerator.num_processes
        grad_norm = accelerator.clip_grad_norm_(objective.parameters(), t.grad_clip)
        last_losses = {"loss_image": float(losses["loss_image"]), "loss_text": float(losses["loss_text"])}
        if any_process(accelerator, nonfinite_loss) or not bool(torch.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            where = (
                f"non-finite loss at step {step + 1} (image {last_losses['loss_image']}, text "
                f"{last_losses['loss_text']}, grad norm {float(grad_norm)})"
            )
            if t.on_nonfinite == "stop":
                kept = latest_checkpoint(ckpt_root)
                raise NonFiniteLossError(
                    f"{where}: training stopped; the last good checkpoint is {kept or 'none (no checkpoint yet)'}. "
                    "Resume with --resume after lowering train.lr, or set train.on_nonfinite=skip to skip such batches"
                )
            nonfinite_skipped += 1
            accelerator.print(f"{where}: batch skipped ({nonfinite_skipped} so far)")
            continue
        optimizer.step()
        if not optimizer.step_was_skipped:  # fp16 loss scaling skips steps with overflowing gradients
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, model, t.ema_decay, step)
        step += 1
        images_seen += step_images
        window_images += step_images
        progress.update()
        progress.set_postfix(img=f"{last_losses['loss_image']:.4f}", txt=f"{last_losses['loss_text']:.3f}")
        # Every process must agree, or one would wait in save() for the others forever.
        out_of_time = t.max_minutes is not None and any_process(
            accelerator, (time.time() - started) > 60 * t.max_minutes
        )
        if step % t.log_every == 0 or step == t.max_steps or out_of_time:
            elapsed = max(time.time() - window_start, 1e-9)
            record = {
                "step": step,
                **last_losses,
                "lr": lr_scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "images_per_s": window_images / elapsed,
                "skipped": skips.total,
                "nonfinite_skipped": nonfinite_skipped,
            }
            if step % t.eval_every == 0 or step == t.max_steps or out_of_time:
                record.update(evaluate())
            log(record)
            window_start, window_images = time.time(), 0
        if step % t.checkpoint_every == 0 and step < t.max_steps and not out_of_time:
            save()
        if out_of_time:
            accelerator.print(f"stopping at step {step}: the {t.max_minutes}-minute budget is spent")
            break
    progress.close()
    final_ckpt = save(final=True)
    if main and t.trackers:
        accelerator.end_training()
    skip_totals = total_skips(skip_counts_per_process(accelerator, skips))
    maybe_write_param_digest(model, rank)
    evals = [r for r in history if "eval_loss_image" in r]
    summary = {
        "steps": step,
        "images_seen": images_seen,
        "minutes": (time.time() - started) / 60,
        "first_eval": evals[0] if evals else None,
        "last_eval": evals[-1] if evals else None,
        "last_losses": last_losses,
        "skips": skip_totals,
        "nonfinite_skipped": nonfinite_skipped,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "num_processes": accelerator.num_processes,
        "pipeline": str(out / "pipeline"),
        "checkpoint": str(final_ckpt) if final_ckpt else None,
    }
    if main:
        kinds = ", ".join(f"{k}={n}" for k, n in skip_totals.items()) or "none"
        accelerator.print(
            f"done at step {step}: skipped records: {kinds}; non-finite batches skipped: {nonfinite_skipped}"
        )
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    # Tear the process group down here, together, rather than in interpreter shutdown, where gloo's threads can
    # abort one rank ("terminate called without an active exception") after a run that itself succeeded.
    accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return summary
