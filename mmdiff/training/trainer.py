"""`mmdiff train`: the accelerate training loop for the shared MMDiT (DESIGN.md, decision 11).

Stages, each skipped when its output already exists in `train.output_dir`: tokenizer, tiny VAE (unless a pretrained
one is configured), then the DiT. Checkpoints hold a sampling-ready pipeline folder with the EMA weights plus the full
training state, all safetensors + JSON.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from ..config import Config, to_yaml
from ..data.loader import SkipStats, expand_urls, make_dataloader, read_captions
from ..data.tokenizer import build_tokenizer, load_tokenizer
from ..diffusion.gaussian import make_noise_scheduler
from ..models.attention import set_attention_backend
from ..models.text_encoders import (
    encode_with_frozen_encoder,
    frozen_encoder_dim,
    load_frozen_text_encoder,
    tokenize_for_frozen_encoder,
)
from ..models.transformer import MMDiTModel
from ..models.vae import encode_latents, load_vae, tiny_vae, vae_downsample_factor
from .checkpoint import (
    atomic_dir,
    checkpoint_name,
    latest_checkpoint,
    load_training_state,
    prune_checkpoints,
    save_training_state,
)
from .losses import JointObjective, LossWeights
from .vae_trainer import train_vae


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


def prepare_tokenizer(cfg: Config, out: Path, accelerator: Accelerator):
    folder = out / "tokenizer"
    if not folder.is_dir():
        if accelerator.is_main_process:
            captions = read_captions(expand_urls(cfg.data.train_shards)) if cfg.tokenizer.kind == "word" else None
            tokenizer = build_tokenizer(cfg.tokenizer.kind, captions=captions, path=cfg.tokenizer.path)
            with atomic_dir(folder) as tmp:
                tokenizer.save_pretrained(tmp)
        accelerator.wait_for_everyone()
    return load_tokenizer(folder)


def prepare_vae(cfg: Config, out: Path, tokenizer, accelerator: Accelerator):
    if cfg.vae.pretrained_path:
        return load_vae(cfg.vae.pretrained_path)
    folder = out / "vae"
    if not folder.is_dir():
        if accelerator.is_main_process:
            loader = make_dataloader(
                cfg.data.train_shards,
                tokenizer,
                cfg.data.image_size,
                cfg.data.max_length,
                cfg.vae.batch_size,
                num_workers=cfg.data.num_workers,
                seed=cfg.train.seed + 1,
                shuffle_buffer=cfg.data.shuffle_buffer,
            )
            vae = tiny_vae(cfg.data.image_size, cfg.vae.latent_channels, tuple(cfg.vae.block_out_channels))
            stats = train_vae(
                vae,
                (b["pixel_values"] for b in loader),
                cfg.vae.train_steps,
                lr=cfg.vae.lr,
                kl_weight=cfg.vae.kl_weight,
                out_dir=folder,
                device=accelerator.device,
                seed=cfg.train.seed,
            )
            print(f"VAE trained: {json.dumps(stats)}")
        accelerator.wait_for_everyone()
    return load_vae(folder)


def build_model(cfg: Config, tokenizer, vae, external_text_dim: int | None) -> MMDiTModel:
    m = cfg.model
    factor = vae_downsample_factor(vae)
    if cfg.data.image_size % (factor * m.patch_size):
        raise ValueError(
            f"data.image_size={cfg.data.image_size} is not divisible by VAE factor {factor} x patch {m.patch_size}"
        )
    return MMDiTModel(
        sample_size=cfg.data.image_size // factor,
        in_channels=vae.config.latent_channels,
        patch_size=m.patch_size,
        vocab_size=len(tokenizer),
        max_text_length=cfg.data.max_length,
        hidden_size=m.hidden_size,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        text_encoder_depth=0 if external_text_dim else m.text_encoder_depth,
        image_encoder_depth=m.image_encoder_depth,
        # a frozen encoder replaces the joint one: no unused encoder layers (DDP would refuse them) null_context_length=m.null_context_length,
        external_text_dim=external_text_dim,
    )


def build_pipeline(transformer, vae, noise_scheduler, tokenizer, text_encoder=None, text_encoder_tokenizer=None):
    """The sampling pipeline for a trained model (DDIM with trailing timesteps by default; swap the diffusers way)."""
    from diffusers import DDIMScheduler

    from ..diffusion.masked import MaskedDiffusionScheduler
    from ..pipelines.text_to_image import MMDiffTextToImagePipeline

    return MMDiffTextToImagePipeline(
        transformer=transformer,
        vae=vae,
        scheduler=DDIMScheduler.from_config(noise_scheduler.config, timestep_spacing="trailing"),
        text_scheduler=MaskedDiffusionScheduler(),
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        text_encoder_tokenizer=text_encoder_tokenizer,
    )


def train(cfg: Config, resume: bool = False) -> dict:
    """Train the shared DiT as configured; returns a summary (steps, first/last losses, output folders)."""
    mixed = cfg.train.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    out = Path(cfg.train.output_dir)
    accelerator = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with=list(cfg.train.trackers) or None,
        project_dir=str(out),
    )
    set_seed(cfg.train.seed + accelerator.process_index)
    set_attention_backend(cfg.model.attention_backend)
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))

    tokenizer = prepare_tokenizer(cfg, out, accelerator)
    vae = prepare_vae(cfg, out, tokenizer, accelerator).to(accelerator.device).requires_grad_(False).eval()
    text_encoder = encoder_tokenizer = None
    if cfg.text_encoder.kind != "joint":
        text_encoder, encoder_tokenizer = load_frozen_text_encoder(cfg.text_encoder.kind, cfg.text_encoder.path)
        text_encoder.to(accelerator.device)
    model = build_model(cfg, tokenizer, vae, frozen_encoder_dim(text_encoder) if text_encoder is not None else None)
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
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
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: get_lr_factor(s, t.warmup_steps, t.max_steps, t.lr_schedule, t.min_lr_ratio)
    )

    step = 0
    ckpt_root = out / "checkpoints"
    if resume and (last := latest_checkpoint(ckpt_root)) is not None:
        extra = load_training_state(last / "training_state", model, ema, optimizer)
        lr_scheduler.load_state_dict(extra["lr_scheduler"])
        step = extra["step"]
        accelerator.print(f"resumed from {last} at step {step}")
    objective = JointObjective(model, noise_scheduler, weights, tokenizer.pad_token_id, tokenizer.mask_token_id)
    objective, optimizer, lr_scheduler = accelerator.prepare(objective, optimizer, lr_scheduler)
    ema.to(accelerator.device)
    if main and t.trackers:
        accelerator.init_trackers("mmdiff", config={"max_steps": t.max_steps, "lr": t.lr, "batch_size": t.batch_size})

    # the loader splits shards by process and worker itself, so it is not passed through accelerator.prepare
    loader = make_dataloader(
        cfg.data.train_shards,
        tokenizer,
        cfg.data.image_size,
        cfg.data.max_length,
        t.batch_size,
        num_workers=cfg.data.num_workers,
        seed=t.seed + step,
        shuffle_buffer=cfg.data.shuffle_buffer,
        caption_choice=cfg.data.caption_choice,
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
                    caption_choice="txt",
                    drop_last=False,
                )
            )
        )

    def batch_inputs(batch):
        pixels = batch["pixel_values"].to(accelerator.device)
        ids = batch["input_ids"].to(accelerator.device)
        with torch.no_grad():
            latents = encode_latents(vae, pixels.to(vae.dtype)).float()
            frozen_text = None
            if text_encoder is not None:
                enc_ids, enc_mask = tokenize_for_frozen_encoder(
                    encoder_tokenizer, batch["captions"], cfg.text_encoder.max_length
                )
                hidden = encode_with_frozen_encoder(
                    text_encoder, enc_ids.to(accelerator.device), enc_mask.to(accelerator.device)
                )
                frozen_text = (hidden.float(), enc_mask.to(accelerator.device))
        return latents, ids, frozen_text

    def losses_for(batch, generator=None):
        latents, ids, frozen_text = batch_inputs(batch)
        return objective(latents, ids, frozen_text, generator)

    @torch.no_grad()
    def evaluate() -> dict:
        if eval_batch is None:
            return {}
        objective.eval()
        with accelerator.autocast():
            losses = losses_for(eval_batch, torch.Generator(accelerator.device).manual_seed(1234))
        objective.train()
        return {"eval_loss_image": float(losses["loss_image"]), "eval_loss_text": float(losses["loss_text"])}

    metrics_path = out / "metrics.jsonl"
    history: list[dict] = []

    def log(record: dict) -> None:
        history.append(record)
        if main:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            if t.trackers:
                accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def save(final: bool = False) -> Path | None:
        accelerator.wait_for_everyone()
        if not main:
            return None
        pipe = build_pipeline(ema, vae, noise_scheduler, tokenizer, text_encoder, encoder_tokenizer)
        target = ckpt_root / checkpoint_name(step)
        with atomic_dir(target) as tmp:
            pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
            (tmp / "pipeline" / "mmdiff_config.yaml").write_text(to_yaml(cfg))
            save_training_state(
                tmp / "training_state", model, ema, optimizer, {"step": step, "lr_scheduler": lr_scheduler.state_dict()}
            )
            (tmp / "config.yaml").write_text(to_yaml(cfg))
        prune_checkpoints(ckpt_root, t.keep_checkpoints)
        if final:
            with atomic_dir(out / "pipeline") as tmp:
                pipe.save_pretrained(tmp, safe_serialization=True)
                (tmp / "mmdiff_config.yaml").write_text(to_yaml(cfg))
        return target

    first_eval = evaluate()
    log({"step": step, **first_eval})
    skips = SkipStats()
    objective.train()
    started = time.time()
    images_seen, window_start, window_images = 0, time.time(), 0
    progress = tqdm(total=t.max_steps, initial=step, disable=not main, desc="train", dynamic_ncols=True)
    data_iter = iter(loader)
    last_losses: dict[str, float] = {}
    while step < t.max_steps:
        for _ in range(t.grad_accum_steps):
            batch = next(data_iter)
            skips.accumulate(batch["skips"])
            with accelerator.accumulate(objective), accelerator.autocast():
                losses = losses_for(batch)
                if not torch.isfinite(losses["loss"]):
                    raise FloatingPointError(
                        f"non-finite loss at step {step}: image {float(losses['loss_image'])}, "
                        f"text {float(losses['loss_text'])}; the last good checkpoint is in {ckpt_root}"
                    )
                accelerator.backward(losses["loss"])
                grad_norm = (
                    accelerator.clip_grad_norm_(objective.parameters(), t.grad_clip)
                    if accelerator.sync_gradients
                    else None
                )
                optimizer.step()
                lr_scheduler.step() if accelerator.sync_gradients else None
                optimizer.zero_grad(set_to_none=True)
            window_images += batch["pixel_values"].shape[0] * accelerator.num_processes
        update_ema(ema, model, t.ema_decay, step)
        step += 1
        images_seen += window_images
        last_losses = {"loss_image": float(losses["loss_image"]), "loss_text": float(losses["loss_text"])}
        progress.update()
        progress.set_postfix(img=f"{last_losses['loss_image']:.4f}", txt=f"{last_losses['loss_text']:.3f}")
        out_of_time = t.max_minutes is not None and (time.time() - started) > 60 * t.max_minutes
        if step % t.log_every == 0 or step == t.max_steps or out_of_time:
            elapsed = max(time.time() - window_start, 1e-9)
            record = {
                "step": step,
                **last_losses,
                "lr": lr_scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "images_per_s": window_images / elapsed,
                "skipped": skips.total,
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
    evals = [r for r in history if "eval_loss_image" in r]
    summary = {
        "steps": step,
        "images_seen": images_seen,
        "minutes": (time.time() - started) / 60,
        "first_eval": evals[0] if evals else None,
        "last_eval": evals[-1] if evals else None,
        "skips": skips.counts,
        "pipeline": str(out / "pipeline"),
        "checkpoint": str(final_ckpt),
    }
    if main:
        accelerator.print(f"skipped records: {skips.summary()}")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
