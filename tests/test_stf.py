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
