"""The ISM / SDS math of guidance/ism.py and guidance/perpneg.py, without a model (closed forms, hand computations)."""
import math

import pytest
import torch
from diffusers import DDIMScheduler
from torch.testing import assert_close

from guidance import ism
from guidance.perpneg import perpendicular_component, perpneg_cfg, perpneg_view


def sd21_scheduler() -> DDIMScheduler:
    """SD 2.1-base's DDIM schedule (scaled-linear betas, steps_offset 1, leading spacing), built in memory."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


@pytest.fixture(scope="module")
def abar64():
    """alphas_cumprod in float64, and the index -> abar map of the project's convention."""
    ac = sd21_scheduler().alphas_cumprod.double()
    return ac, (lambda i: ac[ism.timestep_from_index(i, 1)])


def test_timestep_convention_matches_stock_scheduler_table():
    sched = sd21_scheduler()
    sched.set_timesteps(1000)
    table = torch.flip(sched.timesteps, dims=(0,))  # stock: index -> UNet timestep
    expected = torch.tensor([ism.timestep_from_index(i, sched.config.steps_offset) for i in range(1000)])
    assert torch.equal(table, expected)
    assert table[0] == 1 and table[979] == 980  # "x0 is noised to t=1"; the largest sampled index at iteration 0
    assert table[999] == 1000 == len(sched.alphas_cumprod)  # why the sampled index must stay below 999


def test_add_noise_and_ddim_step_match_diffusers_at_the_same_timestep():
    sched = sd21_scheduler()
    sched.set_timesteps(1000)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    i = 299
    tau = ism.timestep_from_index(i)
    ac = sched.alphas_cumprod
    assert_close(ism.add_noise(x0, eps, ac[tau]), sched.add_noise(x0, eps, torch.tensor([tau])))
    # diffusers' deterministic DDIM step from tau to tau - 1 (1000 inference steps) is our signed ddim_step
    x = sched.add_noise(x0, eps, torch.tensor([tau]))
    ref = sched.step(eps, tau, x, eta=0.0).prev_sample
    assert_close(ism.ddim_step(x, eps, ac[tau], ac[tau - 1]), ref)


def test_inversion_timesteps_strides_clip_on_s():
    assert ism.inversion_timesteps(450, 200, 5) == [0, 200, 400, 450]
    assert ism.inversion_timesteps(200, 200, 5) == [0, 200]
    assert ism.inversion_timesteps(1, 200, 5) == [0, 1]
    assert ism.inversion_timesteps(0, 200, 5) == [0]  # s = 0: no inversion call (stock's discarded call skipped)
    assert ism.inversion_timesteps(900, 200, 2) == [500, 700, 900]  # x0 noised straight to 500, then 2 strides
    for s in range(0, 980, 7):
        chain = ism.inversion_timesteps(s, 200, 5)
        assert chain[-1] == s and len(chain) - 1 == min(math.ceil(s / 200), 5)
    with pytest.raises(ValueError):
        ism.inversion_timesteps(10, 0, 5)


def test_ddim_inversion_then_denoising_returns_the_input_with_exact_eps(abar64):
    """Data = one point x0*: eps(x_i) = (x_i - sqrt(abar_i) x0*) / sqrt(1 - abar_i) is the exact noise predictor."""
    ac, abar = abar64
    gen = torch.Generator().manual_seed(1)
    x0_star = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)

    def eps_fn(x, i):
        return (x - abar(i).sqrt() * x0_star) / (1 - abar(i)).sqrt()

    s, t = 450, 530
    chain = ism.inversion_timesteps(s, 200, 5) + [t]
    x_start = ism.add_noise(x0_star, noise, abar(chain[0]))
    x_t = ism.ddim_walk(x_start, chain, eps_fn, abar)
    assert_close(x_t, ism.add_noise(x0_star, noise, abar(t)), rtol=0, atol=1e-12)  # deterministic path keeps eps
    back = ism.ddim_walk(x_t, chain[::-1], eps_fn, abar)
    assert_close(back, x_start, rtol=0, atol=1e-12)


def test_ddim_step_is_its_own_inverse_for_a_fixed_eps(abar64):
    _, abar = abar64
    gen = torch.Generator().manual_seed(2)
    x, eps = torch.randn(3, 4, 4, 4, generator=gen, dtype=torch.float64), torch.randn(3, 4, 4, 4, generator=gen,
                                                                                    dtype=torch.float64)
    there = ism.ddim_step(x, eps, abar(100), abar(700))
    assert_close(ism.ddim_step(there, eps, abar(700), abar(100)), x, rtol=0, atol=1e-12)


def test_ism_and_sds_gradients_match_a_hand_computation():
    pred = torch.full((2, 4, 2, 2), 0.7)
    target = torch.full((2, 4, 2, 2), 0.2)
    # abar 0.25 -> w = sqrt(0.75 / 0.25) = sqrt(3)
    expected = 0.1 * math.sqrt(3.0) * 0.5
    assert_close(ism.ism_grad(pred, target, 0.25, 0.1), torch.full_like(pred, expected))
    assert_close(ism.sds_grad(pred, target, torch.tensor(0.25), 0.1), torch.full_like(pred, expected))
    # per-sample abar [B] broadcasts over [B, C, h, w]
    per = ism.ism_grad(pred, target, torch.tensor([0.25, 0.5]), 1.0)
    assert_close(per[0], torch.full_like(pred[0], math.sqrt(3.0) * 0.5))
    assert_close(per[1], torch.full_like(pred[1], 1.0 * 0.5))
    assert ism.ism_weight(0.5) == pytest.approx(1.0)


def test_cfg_and_v_to_eps():
    u, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    assert_close(ism.classifier_free_guidance(u, c, 7.5), torch.tensor([1.0 + 7.5 * 2.0, 2.0 - 7.5]))
    assert_close(ism.classifier_free_guidance(u, c, 1.0), c)
    gen = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 4, 4, 4, generator=gen, dtype=torch.float64), torch.randn(2, 4, 4, 4, generator=gen,
                                                                                     dtype=torch.float64)
    a = torch.tensor(0.3, dtype=torch.float64)
    x_t = ism.add_noise(x0, eps, a)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    assert_close(ism.v_to_eps(v, x_t, a), eps, rtol=0, atol=1e-12)


def test_specify_gradient_injects_grad_times_upstream():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 3, 3, generator=gen, requires_grad=True)
    g = torch.randn(2, 4, 3, 3, generator=gen)
    loss = ism.SpecifyGradient.apply(x * 2.0, g)  # through one op: chain rule applies to the injected grad
    assert loss.shape == () and loss.item() == 0.0
    (3.0 * loss).backward()
    assert_close(x.grad, 6.0 * g)


def test_annealing_schedules_hit_their_end_points():
    assert ism.warm_up_rate(0, 1500) == 1.0
    assert ism.warm_up_rate(750, 1500) == 0.5
    assert ism.warm_up_rate(1500, 1500) == 0.0 and ism.warm_up_rate(4000, 1500) == 0.0
    assert ism.timestep_bounds(1.0, [0.02, 0.5], 0.98) == (20, 980)
    assert ism.timestep_bounds(0.0, [0.02, 0.5], 0.98) == (20, 500)
    assert ism.timestep_bounds(0.5, [0.02, 0.5], 0.98) == (20, 740)
    assert ism.interval_delta(1.0, 80, 100) == 100
    assert ism.interval_delta(0.0, 80, 100) == 80
    assert ism.interval_delta(1.0, 80, 100, annealing=False) == 80
    start, end = ism.warm_up_rate(0, 1500), ism.warm_up_rate(1500, 1500)
    assert ism.timestep_bounds(start, [0.02, 0.5], 0.98)[1] == 980 and ism.interval_delta(start, 80, 100) == 100
    assert ism.timestep_bounds(end, [0.02, 0.5], 0.98)[1] == 500 and ism.interval_delta(end, 50, 100) == 50
    r = 1.0 - 1000 / 1500  # 20 r = 6.67: stock ISM truncates, stock Perp-Neg rounds up
    assert ism.interval_delta(r, 80, 100) == 86 and ism.interval_delta(r, 80, 100, round_up=True) == 87


@pytest.mark.parametrize("azimuth, weights", [
    (0, (1, 0, 0)), (45, (0.5, 0.5, 0)), (-45, (0.5, 0.5, 0)), (90, (0, 1, 0)), (-90, (0, 1, 0)),
    (135, (0, 0.5, 0.5)), (-135, (0, 0.5, 0.5)), (180, (0, 0, 1)), (-180, (0, 0, 1)), (360, (1, 0, 0))])
def test_view_prompt_weights(azimuth, weights):
    assert ism.view_prompt_weights(azimuth) == pytest.approx(weights)


def test_perpneg_weights_of_stock():
    blend, names, w = perpneg_view(0, -2.0, 2.0, 10.0)
    assert blend == (1, 0, 0) and names == ("front", "side")
    assert w == pytest.approx((0.0, -2.0))  # r = 1 > 0.8: no front negative; side negative e^0 (-2)
    blend, names, w = perpneg_view(45, -2.0, 2.0, 10.0)
    assert w == pytest.approx((math.exp(-1.0) * -2.0, math.exp(-5.0) * -2.0))
    blend, names, w = perpneg_view(180, -2.0, 2.0, 10.0)
    assert blend == (0, 0, 1) and names == ("side", "front") and w == pytest.approx((-1.0, -2.0))
    blend, names, w = perpneg_view(100, -2.0, 2.0, 10.0)  # back half, r = 8/9 > 0.8: no side negative
    assert w == pytest.approx((0.0, -2.0))


def test_perpneg_combination():
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(3, 4, 4, 4, generator=gen), torch.randn(3, 4, 4, 4, generator=gen)
    perp = perpendicular_component(x, y)
    assert_close((perp * y).sum(dim=(1, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    u, p = torch.randn(3, 4, 4, 4, generator=gen), torch.randn(3, 4, 4, 4, generator=gen)
    negs = [torch.randn(3, 4, 4, 4, generator=gen) for _ in range(2)]
    assert_close(perpneg_cfg(u, p, negs, torch.zeros(2, 3), 7.5), ism.classifier_free_guidance(u, p, 7.5))
    w = torch.tensor([[-2.0, 0.0, 5e-5], [0.0, -1.0, 0.0]])  # |w| <= 1e-4 is skipped, as stock
    expected = ism.classifier_free_guidance(u, p, 7.5).clone()
    expected[0] += 7.5 * -2.0 * perpendicular_component(negs[0] - u, p - u)[0]
    expected[1] += 7.5 * -1.0 * perpendicular_component(negs[1] - u, p - u)[1]
    assert_close(perpneg_cfg(u, p, negs, w, 7.5), expected, atol=1e-5, rtol=1e-5)
