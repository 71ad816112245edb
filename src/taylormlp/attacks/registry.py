"""The table of attacks: each attack module registers its ``run`` here, as optimum-quanto's modules register
with ``register_qmodule``; the audit reads the names, their order, descriptions and costs from this table only.

A built-in attack's rank, description, cost and autograd need are defined in ``taylormlp.common.choices.ATTACKS`` (torch-free,
so that ``taylormlp audit --help`` lists them at once); its module registers only its ``run``:

    @register_attack(NAME)
    def run(ctx: AuditContext, **options) -> dict: ...

An attack from outside that table gives them itself:
``@register_attack(NAME, rank=6, description="...", cost="minutes", no_grad=False)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..common.choices import ATTACKS as BUILT_IN
from ..common.errors import TaylorMLPError


@dataclass(frozen=True)
class Attack:
    name: str
    run: Callable  # run(ctx, **options) -> dict of the attack's numbers, ended by ctx.conclude
    description: str  # one line: what the attacker does and gets
    cost: str  # its typical cost on a small model, e.g. "closed form, seconds" or "minutes"
    rank: int  # position in the canonical order (reports, the default selection)
    no_grad: bool = False  # needs no autograd: the audit runs it under torch.no_grad()


_TABLE: dict[str, Attack] = {}


def register_attack(name: str, *, rank: int | None = None, description: str | None = None, cost: str | None = None,
                    no_grad: bool | None = None):
    """Decorator that enters an attack module's ``run`` in the table under ``name``: a built-in attack's facts come
    from choices.ATTACKS (giving them again is an error: one definition), any other attack must give rank,
    description and cost."""
    given = dict(rank=rank, description=description, cost=cost, no_grad=no_grad)

    def register(run: Callable) -> Callable:
        taken = _TABLE.get(name)
        if taken is not None and taken.run.__module__ != run.__module__:
            raise ValueError(f"attack name {name!r} is already registered by {taken.run.__module__}")
        if name in BUILT_IN:
            if any(value is not None for value in given.values()):
                raise ValueError(f"built-in attack {name!r} takes its rank, description, cost and no_grad from "
                                 f"taylormlp.common.choices.ATTACKS; register it with @register_attack({name!r}) alone")
            info = BUILT_IN[name]
            _TABLE[name] = Attack(name, run, info.description, info.cost, info.rank, info.no_grad)
        else:
            if rank is None or not description or not cost:
                raise ValueError(f"attack {name!r} is not built in (taylormlp.common.choices.ATTACKS): give its rank, "
                                 f"description and cost")
            _TABLE[name] = Attack(name, run, description, cost, rank, bool(no_grad))
        return run

    return register


@dataclass(frozen=True)
class LayerRecovery:
    """An attack's recovery of one layer from that layer's TaylorMLP alone (closed form, no model run), which lets
    the audit stream a release too large to hold: ``recover(mlp, act, x=None, **options) -> (RecoveredLayer,
    numbers, signs or None)``; ``numbers`` are per-layer figures the report takes the largest of, ``x`` optional
    block inputs.  ``up_to_scale``: the weights are scored after the best per-column scale."""

    recover: Callable
    up_to_scale: bool = False


_LAYERWISE: dict[str, LayerRecovery] = {}


def register_layerwise(name: str, up_to_scale: bool = False):
    """Decorator that enters an attack's one-layer recovery (LayerRecovery.recover) under the attack's name."""
    def register(recover: Callable) -> Callable:
        _LAYERWISE[name] = LayerRecovery(recover, up_to_scale)
        return recover

    return register


def layerwise(name: str) -> LayerRecovery | None:
    """The attack's one-layer recovery, None if it needs more than one layer's tensors (it runs the model)."""
    return _LAYERWISE.get(name)


def attack_names() -> tuple[str, ...]:
    """Every registered attack's name, in the canonical order."""
    return tuple(sorted(_TABLE, key=lambda name: (_TABLE[name].rank, name)))


def get_attack(name: str) -> Attack:
    """The registered attack ``name`` (TaylorMLPError naming the choices if there is none)."""
    if name not in _TABLE:
        raise TaylorMLPError(f"unknown attack {name!r}; choose from {', '.join(attack_names())}")
    return _TABLE[name]
