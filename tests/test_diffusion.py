"""Noise processes and guidance: boundary behaviour, hand-computed losses, the CFG rule, the unmasking sampler."""

from __future__ import annotations

import math

import torch

from mmdiff.diffusion.gaussian import noise_latents, timestep_to_t
from mmdiff.diffusion.guidance import classifier_free_guidance, guidance_active
from mmdiff.diffusion.masked import MaskedDiffusionScheduler, mask_tokens, mdlm_loss, sample_mask_levels


def test_gaussian_t0_keeps_latents_and_t1_is_pure_noise(noise_scheduler):
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    T = noise_scheduler.config.num_train_timesteps
    at0, _ = noise_latents(noise_scheduler, z0, noise, torch.zeros(4, dtype=torch.long))  # the first and last
    at1, _ = noise_latents(noise_scheduler, z0, noise, torch.full((4,), T - 1))  # training timesteps
    # DDPM's first timestep keeps sqrt(alpha_bar_0) > 0.9999 of the signal: the residual is noise at std < 1%
    assert (at0 - z0).std() < 0.01
    assert torch.allclose(at1, noise, atol=1e-3)
    assert timestep_to_t(torch.tensor([0, T // 2]), T).tolist() == [0.0, 0.5]


def test_v_prediction_target_is_velocity():
    from mmdiff.diffusion.gaussian import make_noise_scheduler

    sched = make_noise_scheduler({"prediction_type": "v_prediction"})
    z0, noise, ts = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    _, target = noise_latents(sched, z0, noise, ts)
    a = sched.alphas_cumprod[ts].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[ts]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(target, a * noise - s * z0, atol=1e-5)


def test_masking_t0_unchanged_t1_all_masks_and_rate():
    ids = torch.randint(3, 50, (64, 32), generator=torch.Generator().manual_seed(0))
    same, m0 = mask_tokens(ids, torch.zeros(64), mask_token_id=1)
    assert torch.equal(same, ids) and not m0.any()
    masked, m1 = mask_tokens(ids, torch.ones(64), mask_token_id=1)
    assert (masked == 1).all() and m1.all()
    _, half = mask_tokens(ids, torch.full((64,), 0.3), 1, torch.Generator().manual_seed(1))
    assert abs(half.float().mean().item() - 0.3) < 0.03
    fixed = torch.zeros_like(ids, dtype=torch.bool)
    fixed[:, :5] = True
    kept, _ = mask_tokens(ids, torch.ones(64), 1, fixed=fixed)
    assert torch.equal(kept[:, :5], ids[:, :5]) and (kept[:, 5:] == 1).all()


def test_mdlm_loss_matches_hand_computation():
    # one sequence of 3 tokens over a vocabulary of 3; positions 0 and 2 are masked at t = 0.5
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [0.5, 1.5, 0.0]]])
    targets = torch.tensor([[0, 2, 1]])
    is_masked = torch.tensor([[True, False, True]])
    t = torch.tensor([0.5])

    def ce(row, target):
        return -(row[target] - math.log(sum(math.exp(x) for x in row)))

    expected = (ce([2.0, 0.0, -1.0], 0) + ce([0.5, 1.5, 0.0], 1)) / 0.5 / 3
    assert abs(mdlm_loss(logits, targets, is_masked, t).item() - expected) < 1e-6


def test_stratified_mask_levels_cover_the_range():
    t = sample_mask_levels(8, eps=1e-3, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 1e-3 and t.max() <= 1.0
    assert sorted((t * 8).floor().long().tolist()) == list(range(8))  # one per stratum


def test_cfg_rule_and_w1_identity():
    cond, uncond = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    assert torch.equal(classifier_free_guidance(cond, uncond, 1.0), cond)
    assert torch.allclose(classifier_free_guidance(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))
    assert torch.equal(classifier_free_guidance(cond, uncond, 0.0), uncond)
    rescaled = classifier_free_guidance(cond, uncond, 7.0, guidance_rescale=1.0)
    assert torch.allclose(rescaled.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), atol=1e-4)
    assert guidance_active(0.5, 3.0) and not guidance_active(0.5, 1.0)
    assert guidance_active(0.5, 3.0, (0.2, 0.8)) and not guidance_active(0.9, 3.0, (0.2, 0.8))


def _unmask_all(scheduler, ids, logits_fn, steps, **kw):
    scheduler.set_timesteps(steps)
    history = [ids]
    for t in scheduler.timesteps:
        ids = scheduler.step(logits_fn(ids), t, ids, mask_token_id=1, **kw).prev_sample
        history.append(ids)
    return history


def test_unmasking_leaves_no_mask_keeps_fixed_tokens_and_follows_schedule():
    vocab, length, steps = 20, 12, 4
    g = torch.Generator().manual_seed(0)
    table = torch.randn(length, vocab, generator=g)

    def logits_fn(ids):
        return table.expand(ids.shape[0], -1, -1)

    ids = torch.full((3, length), 1)
    ids[0, :3] = torch.tensor([5, 6, 7])  # a fixed prefix
    for remasking in ("low_confidence", "random"):
        history = _unmask_all(
            MaskedDiffusionScheduler(sampler="schedule", remasking=remasking),
            ids,
            logits_fn,
            steps,
            generator=torch.Generator().manual_seed(1),
        )
        final = history[-1]
        assert not (final == 1).any()
        assert final[0, :3].tolist() == [5, 6, 7]
        masked_counts = [int((h[1] == 1).sum()) for h in history]
        assert masked_counts == [12, 9, 6, 3, 0]  # the linear schedule: 1 - i/K of the tokens still masked
        # once unmasked, a token never changes
        for before, after in zip(history, history[1:]):
            clean = before != 1
            assert torch.equal(after[clean], before[clean])
    # argmax decoding with the same logits picks the table's argmax everywhere
    greedy = _unmask_all(MaskedDiffusionScheduler(sampler="schedule"), torch.full((1, length), 1), logits_fn, steps)[-1]
    expected = table.clone()
    expected[:, 1] = -float("inf")
    assert torch.equal(greedy[0], expected.argmax(-1))


def test_scheduler_saves_and_loads(tmp_path):
    sched = MaskedDiffusionScheduler(sampler="schedule", remasking="random", temperature=0.7)
    sched.save_pretrained(tmp_path)
    loaded = MaskedDiffusionScheduler.from_pretrained(tmp_path)
    assert loaded.config.remasking == "random" and loaded.config.temperature == 0.7
