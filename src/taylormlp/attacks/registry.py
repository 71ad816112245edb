"""The table of attacks: each attack module registers its ``run`` here, as optimum-quanto's modules register
with ``register_qmodule``; the audit reads the names, their order, descriptions and costs from this table only.

    @register_attack(NAME, rank=1, description="...", cost="closed form, seconds", no_grad=True)
    def run(ctx: AuditContext, **options) -> dict: ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import TaylorMLPError


@dataclass(frozen=True)
class Attack:
    name: str
    run: Callable  # run(ctx, **options) -> dict of the attack's numbers, ended by ctx.conclude
    description: str  # one line: what the attacker does and gets
    cost: str  # its typical cost on a small model, e.g. "closed form, seconds" or "minutes"
    rank: int  # position in the canonical order (reports, the default selection)
    no_grad: bool = False  # needs no autograd: the audit runs it under torch.no_grad()


_TABLE: dict[str, Attack] = {}


def register_attack(name: str, *, rank: int, description: str, cost: str, no_grad: bool = False):
    """Decorator that enters an attack module's ``run`` in the table under ``name``."""

    def register(run: Callable) -> Callable:
        taken = _TABLE.get(name)
        if taken is not None and taken.run.__module__ != run.__module__:
            raise ValueError(f"attack name {name!r} is already registered by {taken.run.__module__}")
        _TABLE[name] = Attack(name, run, description, cost, rank, no_grad)
        return run

    return register


def attack_names() -> tuple[str, ...]:
    """Every registered attack's name, in the canonical order."""
    return tuple(sorted(_TABLE, key=lambda name: (_TABLE[name].rank, name)))


def get_attack(name: str) -> Attack:
    """The registered attack ``name`` (TaylorMLPError naming the choices if there is none)."""
    if name not in _TABLE:
        raise TaylorMLPError(f"unknown attack {name!r}; choose from {', '.join(attack_names())}")
    return _TABLE[name]
