"""Training objective, optimisation helpers, checkpoints, and a short end-to-end run of `mmdiff train`."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import close_at_scale, make_model, write_tar
from PIL import Image
from safetensors.torch import load_file

from mmdiff.diffusion.process import GaussianProcess
from mmdiff.training.checkpoint import (
    atomic_dir,
    latest_checkpoint,
    load_training_state,
    optimizer_state_from_safetensors,
    optimizer_state_to_safetensors,
    save_training_state,
)
from mmdiff.training.losses import LossWeights, image_task_loss, joint_losses
from mmdiff.training.trainer import get_lr_factor, update_ema


def _batch(tokenizer, n=8):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    captions = ["a small red circle above a large blue square", "there is a small green triangle"] * (n // 2)
    from mmdiff.data.tokenizer import encode_captions

    ids, _ = encode_captions(tokenizer, captions, 12)
    return latents, ids


def test_losses_finite_at_init_and_at_chance(tokenizer, noise_scheduler):
    torch.manual_seed(0)
    from mmdiff.models.transformer import MMDiffTransformer2DModel

    fresh = MMDiffTransformer2DModel(
        sample_size=8, vocab_size=len(tokenizer), max_text_length=12, hidden_size=32, depth=2, num_heads=2
    )
    latents, ids = _batch(tokenizer)
    losses = joint_losses(
        fresh,
        latents,
        ids,
        tokenizer.pad_token_id,
        tokenizer.mask_token_id,
        GaussianProcess(noise_scheduler),
        LossWeights(),
        generator=torch.Generator().manual_seed(0),
    )
    assert all(torch.isfinite(v) for v in losses.values())
    # zero-initialised heads: the image head predicts 0 (loss = E[eps^2] = 1) and the text head is uniform
    assert abs(losses["loss_image"].item() - 1.0) < 0.1
    assert losses["loss_text"].item() > 0


def _seeded_losses(model, tokenizer, noise_scheduler, latents, ids, weights, **kw):
    """joint_losses on a fixed batch with the generator seeded the same every call (same noise, masks, dropout)."""
    pad, mask = tokenizer.pad_token_id, tokenizer.mask_token_id
    generator = torch.Generator().manual_seed(0)
    process = GaussianProcess(noise_scheduler)
    return joint_losses(model, latents, ids, pad, mask, process, weights, generator=generator, **kw)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tokenizer, noise_scheduler):
    model = make_model(tokenizer).train()
    latents, ids = _batch(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def losses():
        weights = LossWeights(image_cond_drop=0.0, text_cond_drop=0.0)
        return _seeded_losses(model, tokenizer, noise_scheduler, latents, ids, weights)

    with torch.no_grad():
        before = losses()
    for _ in range(30):
        opt.zero_grad()
        losses()["loss"].backward()
        opt.step()
    with torch.no_grad():
        after = losses()
    assert after["loss_image"] < 0.8 * before["loss_image"]
    assert after["loss_text"] < 0.5 * before["loss_text"]


def test_text_task_ids_are_what_the_caption_task_learns(tokenizer, noise_scheduler):
    # joint_losses(..., text_task_ids=other): the image -> text loss scores `other`; the text -> image loss still
    # uses input_ids (same generator: same noise, masks and dropout)
    from conftest import perturb

    model = perturb(make_model(tokenizer))
    latents, ids = _batch(tokenizer)

    def losses(**kw):
        return _seeded_losses(model, tokenizer, noise_scheduler, latents, ids, LossWeights(), **kw)

    with torch.no_grad():
        plain, same, other = losses(), losses(text_task_ids=ids), losses(text_task_ids=ids.flip(0))
    assert torch.equal(plain["loss_text"], same["loss_text"]) and torch.equal(plain["loss_image"], same["loss_image"])
    assert torch.equal(plain["loss_image"], other["loss_image"])
    assert not torch.allclose(plain["loss_text"], other["loss_text"])


def test_lr_schedule_and_ema():
    factors = [get_lr_factor(s, 10, 110, "cosine", 0.1) for s in range(111)]
    assert factors[0] == 0.1 and factors[9] == 1.0 and abs(factors[110] - 0.1) < 1e-9
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert get_lr_factor(50, 10, 110, "constant", 0.1) == 1.0
    model, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ema.load_state_dict(model.state_dict())
    with torch.no_grad():
        model.weight.add_(1.0)
    update_ema(ema, model, decay=0.99, step=1000)
    assert torch.allclose(ema.weight, model.weight - 0.99, atol=1e-6)


def test_training_state_round_trip_without_pickle(tmp_path, tokenizer):
    model = make_model(tokenizer).train()
    ema = make_model(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctx, mask = model.null_context("text", 2)
    model(torch.randn(2, 4, 8, 8), 0.5, ctx, mask).square().mean().backward()
    opt.step()
    tensors, meta = optimizer_state_to_safetensors(opt.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    json.dumps(meta)  # everything else is JSON
    rebuilt = optimizer_state_from_safetensors(tensors, meta)
    assert rebuilt["param_groups"] == opt.state_dict()["param_groups"]

    with atomic_dir(tmp_path / "step-00000001") as tmp:
        save_training_state(tmp, model, ema, opt, {"step": 1})
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    model2, ema2 = make_model(tokenizer), make_model(tokenizer)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    torch.manual_seed(123)
    extra = load_training_state(tmp_path / "step-00000001", model2, ema2, opt2)
    assert extra["step"] == 1
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    state, state2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(state[k]["exp_avg"], state2[k]["exp_avg"]) for k in state)


def test_failed_atomic_write_leaves_nothing(tmp_path):
    try:
        with atomic_dir(tmp_path / "step-00000005") as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("killed mid-save")
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == [] and latest_checkpoint(tmp_path) is None


def test_train_end_to_end_writes_pipeline_checkpoint_and_metrics(tmp_path):
    from mmdiff.config import load_config
    from mmdiff.data.shapes import write_shapes_shards
    from mmdiff.pipelines import MMDiffImageToTextPipeline, MMDiffTextToImagePipeline
    from mmdiff.training.trainer import train

    write_shapes_shards(tmp_path / "data", 96, image_size=32, seed=0, val_fraction=0.25, shard_size=32)
    cfg = load_config(
        None,
        [
            f"data.train_shards={tmp_path / 'data' / 'train'}",
            f"data.val_shards={tmp_path / 'data' / 'val'}",
            "data.max_length=12",
            "data.shuffle_buffer=16",
            "vae.block_out_channels=[16,16,16]",
            "vae.train_steps=3",
            "vae.batch_size=8",
            "model.hidden_size=32",
            "model.depth=1",
            "model.num_heads=2",
            "model.text_encoder_depth=1",
            f"train.output_dir={tmp_path / 'run'}",
            "train.batch_size=8",
            "train.max_steps=4",
            "train.warmup_steps=1",
            "train.log_every=2",
            "train.eval_every=2",
            "train.checkpoint_every=2",
            "train.keep_checkpoints=1",
        ],
    )
    summary = train(cfg)
    run = tmp_path / "run"
    assert summary["steps"] == 4
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert all(k in records[-1] for k in ("loss_image", "loss_text", "eval_loss_image", "eval_loss_text", "lr"))
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["step-00000004"]  # keep_checkpoints=1 pruned step 2
    assert (run / "checkpoints" / "step-00000004" / "config.yaml").is_file()
    assert (run / "checkpoints" / "step-00000004" / "training_state" / "optimizer.safetensors").is_file()
    t2i = MMDiffTextToImagePipeline.from_pretrained(run / "pipeline")
    t2i.set_progress_bar_config(disable=True)
    image = t2i("a small red circle", num_inference_steps=2).images[0]
    assert image.size == (32, 32)
    i2t = MMDiffImageToTextPipeline.from_pretrained(run / "pipeline")
    i2t.set_progress_bar_config(disable=True)
    assert len(i2t(image, num_inference_steps=2).text) == 1


def _nan_on_call(monkeypatch, bad_call: int) -> None:
    """Make the trainer's `bad_call`-th VAE encode (one per batch here: no validation set) return NaN latents."""
    import mmdiff.training.trainer as trainer

    real, calls = trainer.encode_latents, {"n": 0}

    def encode(*args, **kwargs):
        calls["n"] += 1
        latents = real(*args, **kwargs)
        return latents * float("nan") if calls["n"] == bad_call else latents

    monkeypatch.setattr(trainer, "encode_latents", encode)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_last_checkpoint(tiny_train_setup, tmp_path, monkeypatch):
    from conftest import stage_run_dir, tiny_train_overrides

    from mmdiff.config import load_config
    from mmdiff.training.resume import NonFiniteLossError
    from mmdiff.training.trainer import train

    stage_run_dir(tiny_train_setup, tmp_path / "run")
    _nan_on_call(monkeypatch, 5)
    cfg = load_config(None, tiny_train_overrides(tiny_train_setup, tmp_path / "run", checkpoint_every=2))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 5 .*step-00000004"):
        train(cfg)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-00000004"


def test_nonfinite_loss_skip_mode_skips_the_batch_and_reports_it(tiny_train_setup, tmp_path, monkeypatch, capsys):
    from conftest import stage_run_dir, tiny_train_overrides

    from mmdiff.config import load_config
    from mmdiff.training.trainer import train

    stage_run_dir(tiny_train_setup, tmp_path / "run")
    _nan_on_call(monkeypatch, 3)
    cfg = load_config(None, tiny_train_overrides(tiny_train_setup, tmp_path / "run", on_nonfinite="skip"))
    summary = train(cfg)
    assert summary["steps"] == 6 and summary["nonfinite_skipped"] == 1
    assert "non-finite batches skipped: 1" in capsys.readouterr().out
    state = load_file(tmp_path / "run" / "checkpoints" / "step-00000006" / "training_state" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values())


def test_training_goes_on_over_bad_records_and_reports_each_kind(tiny_train_setup, tmp_path, capsys):
    from conftest import stage_run_dir, tiny_train_overrides

    from mmdiff.config import load_config
    from mmdiff.data.shapes import png_bytes
    from mmdiff.training.trainer import train

    good = png_bytes(Image.new("RGB", (16, 16), (200, 30, 30)))
    members = [(f"ok{i}.{e}", d) for i in range(6) for e, d in (("png", good), ("txt", b"a small red square"))]
    members += [
        ("corrupt.png", good[:50] + b"\0" * 30),
        ("corrupt.txt", b"a small red square"),
        ("badutf8.png", good),
        ("badutf8.txt", b"\xff\xfe a small"),
        ("empty.png", good),
        ("empty.txt", b"   "),
        ("long.png", good),
        ("long.txt", b" ".join([b"a small red square"] * 6)),
        ("../escape.png", good),
        ("../escape.txt", b"a small red square"),
    ]
    data = tmp_path / "data"
    data.mkdir()
    write_tar(data / "a.tar", members)
    write_tar(data / "b.tar", members[:12])
    cut = (data / "b.tar").read_bytes()
    (data / "b.tar").write_bytes(cut[: len(cut) // 2])  # truncated tar: its complete records are still used
    stage_run_dir(tiny_train_setup, tmp_path / "run")
    overrides = tiny_train_overrides(tiny_train_setup, tmp_path / "run", max_steps=3, **{"data.train_shards": data})
    summary = train(load_config(None, overrides))
    assert summary["steps"] == 3
    kinds = ("corrupt_image", "bad_utf8", "empty_caption", "truncated", "corrupt_tar", "unsafe_name")
    assert all(summary["skips"].get(kind, 0) >= 1 for kind in kinds), summary["skips"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skips"] == summary["skips"]
    printed = capsys.readouterr().out
    assert all(f"{kind}=" in printed for kind in kinds)


def test_checkpoint_files_that_are_truncated_pickled_or_from_another_config_are_refused(tmp_path, tokenizer):
    import pickle

    from mmdiff.training.checkpoint import CheckpointError, CheckpointMismatchError, clean_stale_temp
    from mmdiff.training.resume import load_latest_training_state

    model, ema = make_model(tokenizer), make_model(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in (1, 2):
        with atomic_dir(tmp_path / f"step-{step:08d}") as tmp:
            save_training_state(tmp / "training_state", model, ema, opt, {"step": step})
    newest = tmp_path / "step-00000002" / "training_state"
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_training_state(newest, model, ema, opt)
    messages = []
    extra, folder = load_latest_training_state(tmp_path, model, ema, opt, messages.append)
    assert folder.name == "step-00000001" and extra["step"] == 1 and "cannot resume" in messages[0]

    class Payload:  # unpickling this would create `marker`
        def __reduce__(self):
            return (open, (str(tmp_path / "marker"), "w"))

    (newest / "model.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError):
        load_training_state(newest, model, ema, opt)
    assert not (tmp_path / "marker").exists()  # refused without ever being unpickled

    other = make_model(tokenizer, hidden_size=16)
    with pytest.raises(CheckpointMismatchError, match="does not fit the configured model.*config.yaml"):
        load_training_state(
            tmp_path / "step-00000001" / "training_state",
            other,
            make_model(tokenizer, hidden_size=16),
            torch.optim.AdamW(other.parameters()),
        )

    # debris of a crash inside atomic_dir: a half-written folder is deleted, a moved-aside complete one restored
    (tmp_path / ".step-00000003.tmp-abc").mkdir()
    os.replace(tmp_path / "step-00000001", tmp_path / ".step-00000001.old-123")
    assert clean_stale_temp(tmp_path) == [".step-00000001.old-123", ".step-00000003.tmp-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001", "step-00000002"]


@pytest.mark.parametrize("num_dropped", [0, 2, 4])
def test_image_task_loss_equals_dropping_to_the_null_context(tokenizer, num_dropped):
    # dropped rows go first as null rows (not encoded, constant cross-attention): the loss and its gradients must
    # equal the plain formulation, in which every row is encoded and dropped rows get the null context
    from torch.nn.functional import mse_loss

    from mmdiff.data.tokenizer import encode_captions

    model = make_model(tokenizer)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    ids, _ = encode_captions(tokenizer, ["a small red circle", "there is a small green triangle"] * 2, 12)
    noisy, target, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.rand(4)
    dropped = torch.tensor([False, True, False, True]) if num_dropped == 2 else torch.arange(4) < num_dropped

    def encode(rows):
        rows_ids = ids if rows is None else ids[rows]
        return model.encode_text(rows_ids, rows_ids != tokenizer.pad_token_id)

    fast = image_task_loss(model, noisy, target, t, dropped, encode)
    fast.backward()
    fast_grad = model.blocks[0].attn.qkv.weight.grad.clone()
    model.zero_grad()
    context, mask = model.drop_context(*model.encode_text(ids, ids != tokenizer.pad_token_id), dropped, "text")
    plain = mse_loss(model(noisy, t, context, mask), target)
    plain.backward()
    assert fast.item() == pytest.approx(plain.item(), rel=1e-5)
    assert close_at_scale(fast_grad, model.blocks[0].attn.qkv.weight.grad)
