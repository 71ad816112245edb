"""Fine-tuning attack: LoRA on the attention projections of the release, as released.

Attention, embeddings, norms and the head are released in the clear, and the TaylorMLP blocks are ordinary
differentiable modules, so a user can adapt the release to new text without any MLP weight: TaylorMLP does
not prevent fine-tuning.  This attack recovers NO MLP weight (relative_weight_error is None by design); it
measures how easily the release is adapted (language-model loss before and after a few LoRA steps on the
attacker's text, and on held-out text) and how far the adapted model's greedy output drifts.
"""

from __future__ import annotations

import copy

import torch

from .context import AuditContext, Timer
from .registry import register_attack

NAME = "finetune"

ATTENTION_TARGETS = {"gpt2": ["c_attn"]}
DEFAULT_TARGETS = ["q_proj", "v_proj"]


def _lm_loss(model, seqs) -> float:
    total = count = 0.0
    with torch.no_grad():
        for ids in seqs:
            ids = ids.reshape(1, -1)
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False)
            total += float(out.loss) * (ids.numel() - 1)
            count += ids.numel() - 1
    return total / max(count, 1)


@register_attack(NAME)
def run(ctx: AuditContext, steps: int = 20, lr: float = 1e-3, rank: int = 8, seq_len: int = 128,
        probe: int = 4) -> dict:
    from peft import LoraConfig, get_peft_model

    timer = Timer()
    model_type = ctx.release.config.model_type
    targets = ATTENTION_TARGETS.get(model_type, DEFAULT_TARGETS)
    train = [ids[:seq_len] for ids in ctx.train_sequences()]
    probe_seqs = train[:probe]
    held_out = [seq["ids"] for seq in ctx.reference()]
    with timer:
        model = copy.deepcopy(ctx.release)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets,
                            fan_in_fan_out=(model_type == "gpt2"), bias="none")
        peft_model = get_peft_model(model, config)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    loss_before = _lm_loss(peft_model, probe_seqs)
    held_before = _lm_loss(peft_model, held_out)
    with timer:
        peft_model.train()
        for step in range(steps):
            ids = train[step % len(train)].reshape(1, -1)
            out = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        peft_model.eval()
    loss_after = _lm_loss(peft_model, probe_seqs)
    held_after = _lm_loss(peft_model, held_out)
    out = {
        "relative_weight_error": None,
        "mlp_weights_recovered": False,
        "wall_time_s": timer.elapsed,
        "steps": steps,
        "target_modules": targets,
        "trainable_parameters": int(trainable),
        "train_loss_before": loss_before,
        "train_loss_after": loss_after,
        "heldout_loss_before": held_before,
        "heldout_loss_after": held_after,
        "note": "LoRA on attention needs no MLP weight: the release is adapted as is; W_down stays unknown "
                "to this attacker (combine with coefficient_ratio to get it).",
    }
    return ctx.conclude(NAME, peft_model, out)
