"""The diffusion maths against cases with a known answer: Gaussian data, whose optimal denoiser and
probability-flow ODE solution are analytic. No network is involved, so a failure is the maths'."""

from __future__ import annotations

import math

import pytest
import torch

from training.model.conditioning import Conditions
from training.model.edm import (ObjectiveConfig, PreconditionConfig, karras_sigmas, loss_weight, network_target,
                          precondition, sample_sigmas, weighted_loss)
from training.model.sampler import ClipRequest, GuidedDenoiser, SamplerConfig, join_clips, ode_sample, sample_clip, sample_long

MU, S = 0.7, 0.4  # data ~ N(MU, S^2) per element


def gaussian_denoiser(mu: float | torch.Tensor, s: float):
    """The optimal denoiser E[x0 | x] for data N(mu, s^2): mu + s^2 / (s^2 + sigma^2) (x - mu)."""

    def denoise(x, sigma_B, *_):
        sig = sigma_B.view(-1, *([1] * (x.ndim - 1)))
        m = mu.view(-1, *([1] * (x.ndim - 1))) if isinstance(mu, torch.Tensor) else mu
        return m + s**2 / (s**2 + sig**2) * (x - m)

    return denoise


@pytest.mark.parametrize("parameterization", ["v", "edm"])
def test_network_input_and_target_have_unit_variance_at_every_sigma(parameterization):
    cfg = PreconditionConfig(sigma_data=0.5, parameterization=parameterization)
    g = torch.Generator().manual_seed(0)
    x0 = 0.5 * torch.randn(200_000, generator=g)  # data std = sigma_data
    for sigma in (0.01, 0.3, 1.0, 10.0, 200.0):
        sig = torch.full((x0.numel(),), sigma)
        noisy = x0 + sigma * torch.randn(x0.shape, generator=g)
        p = precondition(sig, cfg, ndim=1)
        assert (p.c_in * noisy).std().item() == pytest.approx(1.0, rel=0.01)
        target = network_target(x0, noisy, sig, cfg)
        assert target.std().item() == pytest.approx(1.0, rel=0.01)
        # c_skip is the Wiener filter of N(0, sigma_data^2): the ideal network outputs 0, i.e. the target
        # carries nothing that is predictable from x.
        assert abs(torch.corrcoef(torch.stack([target, noisy]))[0, 1].item()) < 0.01
        # EDM's weight undoes c_out: the loss is a unit-weight regression of F onto its target.
        torch.testing.assert_close(loss_weight(sig, cfg, 1) * p.c_out**2, torch.ones_like(sig))
    # SVD's convention: the target is v = (n - sigma x0) / sqrt(sigma^2 + 1) when sigma_data = 1.
    svd = PreconditionConfig(sigma_data=1.0, parameterization="v")
    n, sigma = torch.randn(1000, generator=g), 2.5
    x0 = torch.randn(1000, generator=g)
    v = (n - sigma * x0) / math.sqrt(sigma**2 + 1)
    torch.testing.assert_close(network_target(x0, x0 + sigma * n, torch.full((1000,), sigma), svd), v)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 2.0, 20.0])
def test_minimising_the_weighted_loss_recovers_the_posterior_mean(sigma):
    """Fit F = a * (c_in x) + b by minimising our loss on N(MU, S^2) data: the resulting denoiser
    D = c_skip x + c_out F must be the analytic one, slope S^2/(S^2+sigma^2), intercept MU sigma^2/(S^2+sigma^2)."""
    cfg = PreconditionConfig()  # SVD's: sigma_data 1 != S, v-parameterisation
    g = torch.Generator().manual_seed(1)
    n = 100_000
    x0 = MU + S * torch.randn(n, 1, generator=g)
    noisy = x0 + sigma * torch.randn(n, 1, generator=g)
    sig = torch.full((n,), sigma)
    p = precondition(sig, cfg, ndim=2)
    a = torch.zeros(1, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([a, b], lr=1, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = weighted_loss(p.c_skip * noisy + p.c_out * (a * p.c_in * noisy + b), x0, sig, cfg).mean()
        loss.backward()
        return loss

    opt.step(closure)
    c_skip, c_out, c_in = p.c_skip[0, 0].item(), p.c_out[0, 0].item(), p.c_in[0, 0].item()
    slope = c_skip + c_out * a.item() * c_in
    intercept = c_out * b.item()
    assert slope == pytest.approx(S**2 / (S**2 + sigma**2), abs=0.01)
    assert intercept == pytest.approx(MU * sigma**2 / (S**2 + sigma**2), abs=0.01)


def test_ode_sampler_follows_the_exact_probability_flow_of_a_gaussian():
    """The PF-ODE for Gaussian data keeps (x - MU) / sqrt(S^2 + sigma^2) constant, so each noise sample
    has one exact answer. Euler must converge to it at first order, Heun at second."""
    sigma_max = 80.0
    noise = torch.randn(2000, 1, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    exact = MU + (noise * sigma_max - MU) * S / math.sqrt(S**2 + sigma_max**2)
    errors = {}
    for heun in (False, True):
        for steps in (40, 80):
            sigmas = karras_sigmas(steps, 0.002, sigma_max)
            assert sigmas[0] == pytest.approx(sigma_max) and sigmas[-2] == pytest.approx(0.002) and sigmas[-1] == 0
            assert bool((sigmas[1:] < sigmas[:-1]).all())
            x = ode_sample(gaussian_denoiser(MU, S), noise, sigmas, heun=heun)
            errors[heun, steps] = (x - exact).abs().max().item()
    assert errors[True, 80] < 0.01  # Heun, 80 steps: within 2.5% of the data's std everywhere
    assert errors[False, 80] < 0.1
    assert errors[False, 40] / errors[False, 80] == pytest.approx(2.0, rel=0.2)  # first order
    assert errors[True, 40] / errors[True, 80] == pytest.approx(4.0, rel=0.3)  # second order
    x = ode_sample(gaussian_denoiser(MU, S), noise, karras_sigmas(80, 0.002, sigma_max), heun=True)
    assert x.mean().item() == pytest.approx(MU, abs=0.02)
    assert x.std().item() == pytest.approx(S, rel=0.03)


def _text_mean_denoiser(s: float):
    """A Gaussian whose mean is the (scalar) text condition: text zeros = the unconditional N(0, s^2)."""

    def denoise(x, sigma_B, cond: Conditions):
        return gaussian_denoiser(cond.text_BLD[:, 0, 0], s)(x, sigma_B)

    return denoise


def _conditions(b: int, t: int, text_value: float) -> Conditions:
    return Conditions(text_BLD=torch.full((b, 1, 1), text_value), c_image_BTCHW=torch.zeros(b, t, 1, 2, 2),
                      added_time_ids_B3=torch.zeros(b, 3), image_only_B=torch.zeros(b, dtype=torch.bool))


def test_framewise_guidance_moves_each_frame_by_its_own_scale():
    """CFG with D_u for N(0, s^2) and D_c for N(mu_c, s^2) at scale w samples N(w mu_c, s^2): with SVD's
    scale rising over frames, frame t's mean must be w_t * mu_c."""
    b, t, mu_c = 1000, 3, 0.5
    cond = _conditions(b, t, mu_c)
    scales = SamplerConfig(cfg_min_scale=1.0, cfg_scale=3.0).frame_scales(t)
    guided = GuidedDenoiser(_text_mean_denoiser(S), cond, cond.without_text(), scales, last_frame_steps=0)
    noise = torch.randn(b, t, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    x = ode_sample(guided, noise, karras_sigmas(60, 0.002, 80.0), heun=True)
    per_frame = x.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_frame.mean(1), scales * mu_c, atol=0.03, rtol=0)
    torch.testing.assert_close(per_frame.std(1), torch.full((t,), S), atol=0, rtol=0.05)


def test_last_frame_instruction_guides_only_the_first_tau_steps():
    seen = []

    def recording_denoiser(x, sigma_B, cond: Conditions):
        c = cond.c_image_BTCHW
        seen.append((c[:, 0].abs().sum().item() > 0, c[:, -1].abs().sum().item() > 0,
                     c[:, 1:-1].abs().sum().item()))
        return torch.zeros_like(x)

    first, last = torch.ones(1, 1, 2, 2), 2 * torch.ones(1, 1, 2, 2)
    config = SamplerConfig(num_steps=10, tau=0.3, cfg_scale=1.0, cfg_min_scale=1.0, sigma_max=10.0)
    request = ClipRequest(torch.zeros(1, 1, 1), first, last, num_frames=4, latent_hw=(2, 2))
    sample_clip(recording_denoiser, request, config, latent_channels=1, scaling_factor=0.5)
    assert [s[1] for s in seen] == [True] * 3 + [False] * 7
    assert all(s[0] for s in seen)  # the first frame guides every step
    assert all(s[2] == 0 for s in seen)  # frames between the instructions are zeros


def test_autoregressive_clips_chain_last_frame_into_next_first_instruction():
    """A denoiser that always answers the clip's index makes every sample exactly that constant, so the
    first-frame instruction each clip received shows where it came from."""
    firsts, lasts = [], []

    def recorder(x, sigma_B, cond: Conditions):
        if sigma_B[0] == config.sigma_max:  # the first step of a new clip
            firsts.append(cond.c_image_BTCHW[0, 0, 0, 0, 0].item())
            lasts.append(cond.c_image_BTCHW[0, -1].abs().sum().item() > 0)
        return torch.full_like(x, float(len(firsts) - 1))

    config = SamplerConfig(num_steps=4, tau=1.0, cfg_scale=1.0, cfg_min_scale=1.0, sigma_max=10.0,
                           noise_aug_strength=0.0)
    first = torch.full((1, 1, 2, 2), 7.0)
    last = torch.full((1, 1, 2, 2), 9.0)
    clips = sample_long(recorder, torch.zeros(1, 1, 1), first, last, num_frames=3, num_clips=3,
                        latent_hw=(2, 2), config=config, latent_channels=1, scaling_factor=1.0)
    # the sampler's last Euler step lands within float rounding of the denoiser's answer
    assert firsts == pytest.approx([7.0, 0.0, 1.0], abs=1e-6)  # the user's frame, then clips 0's and 1's last
    assert lasts == [False, False, True]  # the last-frame instruction guides the final clip only
    assert [c[0, 0, 0, 0, 0].item() for c in clips] == pytest.approx([0.0, 1.0, 2.0], abs=1e-6)
    assert join_clips(clips).shape[1] == 3 + 2 + 2  # later clips drop their repeated first frame


def test_training_sigmas_are_log_normal_with_the_stage_parameters():
    cfg = ObjectiveConfig(p_mean=0.7, p_std=1.6)
    log_sigma = sample_sigmas(50_000, cfg, torch.Generator().manual_seed(4)).log()
    assert log_sigma.mean().item() == pytest.approx(0.7, abs=0.03)
    assert log_sigma.std().item() == pytest.approx(1.6, rel=0.02)
