"""Attacks on a TaylorMLP release (one module each), the machinery they share (context.py: ``AuditContext``), and
`taylormlp audit` (audit.py; stream_audit.py: layer by layer).

Every attack module registers its ``run(ctx, **options) -> dict`` with ``register_attack`` (``ATTACKS`` and
``get_attack`` read that table) and ends it with ``ctx.conclude`` (the one ``verdict``).  An attack may use only what a
release user has: the release model (Θ, the signed gate rows, W_up, z0, h, the public ``rest`` MLP, all
non-MLP weights), its tokenizer and text of its own.  The original model, when given, is used only to
SCORE the result (``ctx.score_*``), never by the attack itself.

Conventions for a recovered layer (``RecoveredLayer``, float64, original orientation):
V [P, d] gate rows (sign removed), b [P] or None, U [P, d] or None, W [d, P] down columns, c [d] or None —
in the release's protected-channel order.  ``rebuild_model`` turns them (plus the public rest channels)
into a stock transformers model of the original architecture: no TaylorMLP, no trust_remote_code.
"""

# importing an attack module registers it (registry.register_attack); each imports context, registry and scoring,
# never this package: no circle
from . import coefficient_ratio, distill, factorization, finetune, regression  # noqa: F401
from .context import AuditContext, AuditOptions, RecoveredLayer, Timer, rebuild_model  # noqa: F401 - the API
from .registry import Attack, attack_names, get_attack, layerwise, register_attack, register_layerwise  # noqa: F401
from .scoring import WeightScore, match_channels  # noqa: F401 - the attacks' API
from .verdicts import verdict  # noqa: F401

ATTACKS = attack_names()
