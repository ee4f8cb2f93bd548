"""STF score against the exact score of the noised empirical mixture and the true Gaussian score."""
import math

import pytest
import torch

from guidance.stf import matching_loss, stf_eps, stf_score, stf_weights


def mixture_log_density(x_t, ref, a, s):
    """log (1/n) sum_k N(x_t; a x0_k, s^2 I), by brute force over k."""
    d = x_t[0].numel()
    logs = torch.stack([(-((x_t - a * r) ** 2).reshape(x_t.shape[0], -1).sum(1) / (2 * s ** 2)
                         - d * math.log(s) - 0.5 * d * math.log(2 * math.pi)) for r in ref], dim=1)
    return torch.logsumexp(logs, dim=1) - math.log(len(ref))


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0, 3.0])
def test_stf_equals_autograd_score_of_empirical_mixture(sigma):
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(7, 2, 3, 3, generator=g, dtype=torch.float64)
    alpha = math.sqrt(max(1 - sigma ** 2, 0.05))
    x_t = (alpha * ref[:3] + sigma * torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)).requires_grad_()
    (grad,) = torch.autograd.grad(mixture_log_density(x_t, ref, alpha, sigma).sum(), x_t)
    torch.testing.assert_close(stf_score(x_t.detach(), ref, alpha, sigma), grad, rtol=1e-9, atol=1e-9)


def test_per_sample_alpha_sigma_and_weights_sum_to_one():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(5, 4, generator=g, dtype=torch.float64)
    x_t = torch.randn(3, 4, generator=g, dtype=torch.float64)
    alpha = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    sigma = (1 - alpha ** 2).sqrt()
    w = stf_weights(x_t, ref, alpha, sigma)
    torch.testing.assert_close(w.sum(1), torch.ones(3, dtype=torch.float64))
    batched = stf_score(x_t, ref, alpha, sigma)
    for b in range(3):
        single = stf_score(x_t[b:b + 1], ref, float(alpha[b]), float(sigma[b]))
        torch.testing.assert_close(batched[b:b + 1], single)


def test_tiny_sigma_is_stable():
    ref = torch.tensor([[0.0, 0.0], [100.0, 100.0]])
    x_t = torch.tensor([[50.0, 49.0]])
    out = stf_score(x_t, ref, 1.0, 1e-3)
    assert torch.isfinite(out).all()  # naive exp(-d2 / 2 sigma^2) underflows to 0/0 here


def test_approaches_true_gaussian_score_as_reference_grows():
    # data ~ N(mu, I): the noised marginal is N(a mu, (a^2 + s^2) I), score -(x - a mu) / (a^2 + s^2)
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([1.0, -2.0], dtype=torch.float64)
    a, s = 0.6, 0.8
    x_t = a * mu + torch.randn(64, 2, generator=g, dtype=torch.float64)
    true = -(x_t - a * mu) / (a ** 2 + s ** 2)
    errors = []
    for n in (10, 100, 10_000):
        ref = mu + torch.randn(n, 2, generator=g, dtype=torch.float64)
        errors.append((stf_score(x_t, ref, a, s) - true).norm(dim=1).mean().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05


def test_matching_loss_zero_for_exact_denoiser_and_larger_when_perturbed():
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(6, 4, 4, generator=g)
    a, s = 0.7, math.sqrt(1 - 0.49)
    x_t = a * ref[:4] + s * torch.randn(4, 4, 4, generator=g)
    exact = stf_eps(x_t, ref, a, s)  # the exact denoiser of the reference set, in eps form
    assert matching_loss(exact, x_t, ref, a, s).abs().max() < 1e-5
    assert matching_loss(exact, x_t, ref, a, s, space="score").abs().max() < 1e-4
    worse = matching_loss(exact + 0.1 * torch.randn(4, 4, 4, generator=g), x_t, ref, a, s)
    assert (worse > 0.05).all()
    with pytest.raises(ValueError, match="space"):
        matching_loss(exact, x_t, ref, a, s, space="latent")


# ----------------------------------------------------------------------------------------------------------------------
# the two readings of the reference set: references only (Eq. 11 as written) vs the scored x_0 included (Xu et al.)
# ----------------------------------------------------------------------------------------------------------------------
def sd_alpha_sigma(index: int) -> tuple[float, float]:
    """SD's scaled-linear schedule (beta 0.00085..0.012, 1000 steps), at the guidance's convention tau = index + 1."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[index + 1]
    return abar.sqrt().item(), (1 - abar).sqrt().item()


def test_self_included_equals_the_brute_force_concatenation():
    """Batched self_x0 == one call per row with the row's x_0 appended to the reference set (per-sample alpha)."""
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    x0 = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    alpha = torch.tensor([0.99, 0.8, 0.5, 0.1], dtype=torch.float64)
    sigma = (1 - alpha ** 2).sqrt()
    x_t = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * torch.randn(x0.shape, generator=g,
                                                                                       dtype=torch.float64)
    w = stf_weights(x_t, ref, alpha, sigma, self_x0=x0)
    assert w.shape == (4, 7)
    torch.testing.assert_close(w.sum(1), torch.ones(4, dtype=torch.float64))
    batched_eps = stf_eps(x_t, ref, alpha, sigma, self_x0=x0)
    batched_score = stf_score(x_t, ref, alpha, sigma, self_x0=x0)
    pred = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    for b in range(4):
        refs_b = torch.cat([ref, x0[b:b + 1]])  # the explicit reference batch of Xu et al.: the sample itself too
        a_b, s_b = float(alpha[b]), float(sigma[b])
        torch.testing.assert_close(w[b:b + 1], stf_weights(x_t[b:b + 1], refs_b, a_b, s_b))
        torch.testing.assert_close(batched_eps[b:b + 1], stf_eps(x_t[b:b + 1], refs_b, a_b, s_b))
        torch.testing.assert_close(batched_score[b:b + 1], stf_score(x_t[b:b + 1], refs_b, a_b, s_b))
        for space in ("eps", "score"):
            for normalize in (True, False):
                want = matching_loss(pred[b:b + 1], x_t[b:b + 1], refs_b, a_b, s_b, space, normalize)
                got = matching_loss(pred, x_t, ref, alpha, sigma, space, normalize, self_x0=x0)[b:b + 1]
                torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="self_x0 must have x_t's shape"):
        stf_eps(x_t, ref, alpha, sigma, self_x0=x0[:2])


def test_self_included_tends_to_the_true_eps_as_t_goes_to_zero():
    """One far reference r and the sample's own x_0: closed form eps_approx = eps + alpha w_r (x_0 - r) / sigma with
    w_r = sigmoid((||x_t - alpha x_0||^2 - ||x_t - alpha r||^2) / (2 sigma^2)), so eps_approx -> eps (the denoising
    target) as t -> 0; without x_0 in the set, eps_approx = eps + alpha (x_0 - r) / sigma runs away."""
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    ref = torch.full((1, 8), 4.0, dtype=torch.float64)
    errors, without = [], []
    for sigma in (0.99, 0.9, 0.7, 0.4, 0.2, 0.05):
        alpha = math.sqrt(1 - sigma ** 2)
        x_t = alpha * x0 + sigma * eps
        d_self, d_ref = ((x_t - alpha * x0) ** 2).sum(1), ((x_t - alpha * ref) ** 2).sum(1)
        w_ref = torch.sigmoid((d_self - d_ref) / (2 * sigma ** 2))[:, None]
        closed = eps + alpha * w_ref * (x0 - ref) / sigma
        got = stf_eps(x_t, ref, alpha, sigma, self_x0=x0)
        torch.testing.assert_close(got, closed, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(stf_eps(x_t, ref, alpha, sigma), eps + alpha * (x0 - ref) / sigma)
        errors.append((got - eps).norm(dim=1).max().item())
        without.append((stf_eps(x_t, ref, alpha, sigma) - eps).norm(dim=1).min().item())
    assert errors[0] > 0.1 and max(errors[-3:]) < 1e-9
    assert all(a < b for a, b in zip(without, without[1:])) and without[-1] > 100


def test_self_included_is_stable_at_tiny_sigma_in_float32():
    g = torch.Generator().manual_seed(5)
    ref, x0 = 3 + torch.randn(4, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    s = 1e-3
    a = (1 - s ** 2) ** 0.5
    out = stf_eps(a * x0 + s * eps, ref, a, s, self_x0=x0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, eps, rtol=0, atol=2e-2)


def test_exact_noise_network_scores_the_nearest_reference_without_self_and_zero_with_it():
    """Why the reading matters (synthetic N(0,1) latents, 32 references, SD's schedule, eps space, RMS): a network
    that returns the exact noise eps scores ~6.0 at t = 50 and ~1.0 at t = 450 when its own x_0 is left out (the
    weights pick the nearest reference: the loss is alpha ||x_0 - x0_nn|| / sigma / sqrt(D), a distance to the set,
    not a property of the network), and ~0 when it is in the set (the loss is then the network's denoising error)."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(32, 4, 32, 32, generator=g, dtype=torch.float64)
    x0 = torch.randn(8, 4, 32, 32, generator=g, dtype=torch.float64)
    d = x0[0].numel()
    nearest = torch.cdist(x0.reshape(8, -1), ref.reshape(32, -1)).min(dim=1).values  # ||x_0 - x0_nn||
    for t, want in ((50, 6.0), (450, 1.0)):
        alpha, sigma = sd_alpha_sigma(t)
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        x_t = alpha * x0 + sigma * eps
        left_out = matching_loss(eps, x_t, ref, alpha, sigma)
        included = matching_loss(eps, x_t, ref, alpha, sigma, self_x0=x0)
        assert left_out.mean().item() == pytest.approx(want, rel=0.1)
        if t == 50:  # small t: the weights are one-hot on the nearest reference
            torch.testing.assert_close(left_out, alpha * nearest / sigma / d ** 0.5, rtol=0.02, atol=0)
        assert included.max().item() < 1e-6
