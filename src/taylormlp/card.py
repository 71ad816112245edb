"""The model card's rows about the throttle (release.model_card puts them in its table): what `--slowdown` asked
for, what was measured at the serving batch, the slowdown curve over batch sizes, the FLOPs and bytes ratios and
the machine.  Every value comes from the release spec's ``slowdown`` record (throttle.protect_for_slowdown)."""

from __future__ import annotations


def machine_words(machine: dict | None) -> str:
    """Where a slowdown was measured, in words: the GPU's name, or the CPU with its torch threads."""
    if not machine:
        return "the machine that ran protect"
    return machine.get("gpu") or f"{machine.get('cpu')}, {machine.get('threads')} threads"


def slowdown_rows(slowdown: dict) -> list[str]:
    """Markdown table rows ("| field | value |") for a ``slowdown`` record; records written before the serving batch
    existed (no "serving_batch", no "curve") were measured at batch 1."""
    batch = slowdown.get("serving_batch", 1)
    where = machine_words(slowdown.get("machine"))
    rows = [f"| requested decode slowdown | {slowdown['target']}x at batch {batch} (throughput of {batch} "
            f"concurrent sequences, release / original) |",
            f"| measured decode slowdown | {slowdown['measured']:.2f}x at batch {batch} (interleaved with the "
            f"original, on {where}; a slowdown is a property of the machine and of the batch size) |"]
    curve = slowdown.get("curve") or []
    if curve:
        rows.append("| measured slowdown curve (batch: slowdown) | "
                    + ", ".join(f"{point['batch']}: {point['measured']:.2f}x" for point in curve)
                    + " (one interleaved run after the choice) |")
    if slowdown.get("flops_ratio"):
        rows.append(f"| FLOPs per token, release / original | {slowdown['flops_ratio']:.2f}x |")
    if slowdown.get("bytes_ratio"):
        rows.append(f"| parameter bytes read per decoded token, release / original | {slowdown['bytes_ratio']:.2f}x "
                    f"(what a memory-bound decoder pays) |")
    return rows
