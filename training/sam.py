"""Sharpness-Aware Minimization (Foret et al., 2021) around any base optimizer.

Each step takes two gradients: the ascent step moves the weights to w + eps with
eps = rho * g / ||g||_2 (g the full gradient, one norm over all parameters), the gradient taken
there is the one the base optimizer applies, at the original weights w.
"""

from __future__ import annotations

import torch


def sam_perturbation(grads: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """eps = rho * g / ||g||_2 with the global L2 norm of all gradients (zero when g is zero)."""
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)) if grads else torch.tensor(0.0)
    scale = rho / (norm + 1e-12)
    return [(g.double() * scale).to(g.dtype) for g in grads]


class SAM(torch.optim.Optimizer):
    def __init__(self, params, base_optimizer_cls: type[torch.optim.Optimizer], rho: float = 0.05, **kwargs):
        if rho <= 0:
            raise ValueError(f"rho must be positive, got {rho}")
        self.rho = rho
        super().__init__(params, dict(kwargs))
        self.base_optimizer = base_optimizer_cls(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups  # one set of groups, so schedulers drive both

    @torch.no_grad()
    def first_step(self) -> None:
        """Climb to w + eps; remember eps to undo it."""
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        eps = sam_perturbation([p.grad for p in params], self.rho)
        for p, e in zip(params, eps):
            p.add_(e)
            self.state[p]["eps"] = e

    @torch.no_grad()
    def second_step(self) -> None:
        """Back to w, then the base optimizer's update with the gradient taken at w + eps."""
        for group in self.param_groups:
            for p in group["params"]:
                if "eps" in self.state[p]:
                    p.sub_(self.state[p].pop("eps"))
        self.base_optimizer.step()

    def step(self, closure=None):  # noqa: D401 - torch API
        """Full SAM step; `closure` must zero grads, compute the loss and call backward."""
        if closure is None:
            raise RuntimeError("SAM needs a closure that re-evaluates the loss; or call first_step/second_step")
        closure = torch.enable_grad()(closure)
        self.first_step()
        self.zero_grad()
        closure()
        self.second_step()

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
