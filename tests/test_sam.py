import torch
from torch import nn

from training.sam import SAM, sam_perturbation


def test_perturbation_is_rho_times_normalised_global_gradient():
    g = [torch.tensor([3.0, 0.0]), torch.tensor([[0.0, 4.0]])]
    eps = sam_perturbation(g, rho=0.5)
    assert torch.allclose(eps[0], torch.tensor([0.3, 0.0]))  # ||g|| = 5
    assert torch.allclose(eps[1], torch.tensor([[0.0, 0.4]]))
    norm = torch.sqrt(sum((e ** 2).sum() for e in eps))
    assert torch.isclose(norm, torch.tensor(0.5))


def test_sam_step_climbs_by_eps_then_applies_the_gradient_taken_there():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    w0 = [p.detach().clone() for p in model.parameters()]
    loss_fn = lambda: ((model(x) - y) ** 2).mean()

    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.01)
    loss_fn().backward()
    g0 = [p.grad.clone() for p in model.parameters()]
    opt.first_step()
    expected_eps = sam_perturbation(g0, 0.1)
    for p, w, e in zip(model.parameters(), w0, expected_eps):
        assert torch.allclose(p, w + e, atol=1e-7)  # the ascent step

    opt.zero_grad()
    loss_fn().backward()
    g_adv = [p.grad.clone() for p in model.parameters()]
    opt.second_step()
    for p, w, g in zip(model.parameters(), w0, g_adv):
        assert torch.allclose(p, w - 0.01 * g, atol=1e-7)  # SGD step from w with the gradient at w + eps
