"""Distillation attack: train ordinary MLP blocks (the original's shape) to imitate each released block.

A black-box baseline that ignores the series structure: the attacker runs its own text through the release,
records each MLP block's inputs and outputs, and trains a student block per layer by Adam on the mean squared
error.  The student starts from what is public — the released gate rows (signed as released; the attacker
does not know the signs), W_up, and for the plain family a gate bias of −z0 (centring each channel on its
released interval) — with W_down at zero, and the public unprotected channels copied and frozen.  Scored by
output fidelity on held-out rows and, with the original, by the error of the student's down-projection
columns (released channel order = matched original channels).  Channels whose hidden sign is −1 cannot be
represented with the released gate row (act(−z) is not a multiple of act(z)), so the student's weights for
them are wrong even when its outputs fit well: compare with the regression attack, which resolves signs.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import runtime
from .context import AuditContext, RecoveredLayer, Timer, one_piece_per_channel
from .factorization import shared_copy
from .registry import register_attack

NAME = "distill"


class StudentMLP(nn.Module):
    """Protected part as a trainable ordinary MLP, plus the public rest (frozen)."""

    def __init__(self, mlp: "runtime.TaylorMLP", act: str):
        super().__init__()
        d, P = mlp.hidden, mlp.protected
        self.family = mlp.family
        self.act = runtime.torch_activation(act)
        plain = mlp.family == "plain"
        self.gate = nn.Linear(d, P, bias=plain)
        self.up = nn.Linear(d, P, bias=False) if mlp.up is not None else None
        self.down = nn.Linear(P, d, bias=plain)
        with torch.no_grad():
            self.gate.weight.copy_(mlp.gate.weight.float())
            if plain:
                self.gate.bias.copy_(-one_piece_per_channel(mlp).z0.float())
                self.down.bias.zero_()
            if self.up is not None:
                self.up.weight.copy_(mlp.up.weight.float())
            self.down.weight.zero_()
        self.rest = mlp.rest  # public, shared with the release, not trained

    def protected(self, x):
        a = self.act(self.gate(x))
        if self.up is not None:
            a = a * self.up(x)
        return self.down(a)

    def forward(self, x):
        y = self.protected(x.float()).to(x.dtype)
        if self.rest is not None:
            y = y + self.rest(x)
        return y


def _rel_mse(pred, target) -> float:
    return float(((pred - target) ** 2).sum() / (target ** 2).sum().clamp_min(1e-30))


def train_layer(mlp, act: str, x: torch.Tensor, steps: int, lr: float, batch: int, holdout: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    with torch.no_grad():
        y = mlp(x.to(mlp.theta.dtype)).float()
        if mlp.rest is not None:
            y = y - mlp.rest(x.to(mlp.theta.dtype)).float()
    perm = torch.randperm(len(x), generator=g)
    n_hold = max(1, int(len(x) * holdout))
    hold, train = perm[:n_hold], perm[n_hold:]
    student = StudentMLP(mlp, act)
    params = [p for n, p in student.named_parameters() if not n.startswith("rest.")]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    scale = float((y[train] ** 2).mean().clamp_min(1e-30))
    with torch.no_grad():
        before = _rel_mse(student.protected(x[train]), y[train])
    for _ in range(steps):
        idx = train[torch.randint(0, len(train), (min(batch, len(train)),), generator=g)]
        loss = ((student.protected(x[idx]) - y[idx]) ** 2).mean() / scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        after = _rel_mse(student.protected(x[train]), y[train])
        held = _rel_mse(student.protected(x[hold]), y[hold])
    return student.eval(), {"loss_before": before, "loss_after": after, "heldout_loss": held}


@register_attack(NAME)
def run(ctx: AuditContext, steps: int = 200, lr: float = 3e-3, batch: int = 256, holdout: float = 0.2) -> dict:
    timer = Timer()
    inputs = ctx.layer_inputs()
    replace, infos, recovered = {}, [], {}
    with timer:
        for i, mlp in ctx.layers:
            if mlp.protected == 0:
                continue
            student, info = train_layer(mlp, ctx.act, inputs[i], steps, lr, batch, holdout, ctx.options.seed + i)
            replace[mlp] = student
            infos.append(info)
            recovered[i] = RecoveredLayer(
                V=student.gate.weight.detach().double(),
                b=student.gate.bias.detach().double() if student.gate.bias is not None else None,
                U=student.up.weight.detach().double() if student.up is not None else None,
                W=student.down.weight.detach().double(),
                c=student.down.bias.detach().double() if student.down.bias is not None else None)
        attacker = shared_copy(ctx.release, replace).eval()
    mean = lambda key: sum(i[key] for i in infos) / max(len(infos), 1)  # noqa: E731
    out = {
        "relative_weight_error": None,
        "wall_time_s": timer.elapsed + ctx.capture_time,
        "steps_per_layer": steps,
        "loss_before": mean("loss_before"),
        "loss_after": mean("loss_after"),
        "heldout_relative_mse": mean("heldout_loss"),
        "output_fidelity": 1.0 - mean("heldout_loss"),
    }
    score = ctx.score_weights(recovered)
    if score is not None:
        out["relative_weight_error"] = score["relative_weight_error"]
    return ctx.conclude(NAME, attacker, out)
