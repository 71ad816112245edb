"""The slowdown curve on a GPU, predicted from machine-independent work (issue 17, item 5): a PREDICTION, not a
measurement (benchmarks/gpu_check.sh measures it where a GPU is lent).

Work (`step_work`): one cached decode step at batch B (decode.one_step: the prompt's KV cache repeated B times),
every aten operator counted under a TorchDispatchMode, on any machine — the counts depend on the model's shapes,
not on this machine's speed:

* bytes: every input tensor read and every output written, once per operator (no fusion, as eager PyTorch runs
  it; expanded views count their storage, not their elements).  At small batches this is the weights: bytes
  read per decoded token, what a memory-bound step pays;
* FLOPs: matmuls 2·m·n·k (torch.utils.flop_counter's formulas), attention 4·B·H·L_q·L_k·D, every other
  operator one per output element (the elementwise series work: the basis recurrence, ⊙ u, the piece masks);
* kernels: operators that launch one (views, allocations and metadata excluded); host syncs (a tensor's value
  read on the host: the runtime's `excess.any()` per layer) apart.

Roofline (`step_seconds`): per operator t = max(bytes / bandwidth, FLOPs / rate), the rate being the GPU's dense
tensor-core rate for bf16/fp16 matmuls and its FP32 rate for float32 matmuls (PyTorch's default: TF32 off) and
for everything else.  "engine": Σ t (kernels back to back, launches hidden, as CUDA graphs or a serving engine
do); "eager": Σ max(t, LAUNCH_S) (every kernel at least one launch: PyTorch's eager overhead per operator, which
dominates small models).  The slowdown at batch B is the release's step time over the original's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cost import step_work  # noqa: F401 - predict.step_work: the work this module's roofline times


@dataclass(frozen=True)
class GPU:
    name: str
    bandwidth: float  # bytes/s, HBM/GDDR (datasheet)
    fp32: float  # FLOP/s, FP32 (non-tensor; PyTorch's float32 matmuls with TF32 off, and elementwise work)
    tensor: float  # FLOP/s, dense BF16/FP16 tensor cores (FP32 accumulate), no sparsity


# datasheet figures (SXM parts; RTX 4090: BF16 with FP32 accumulate), assumed, not measured
GPUS = (
    GPU("H200 SXM", 4.8e12, 67e12, 989e12),
    GPU("H100 SXM", 3.35e12, 67e12, 989e12),
    GPU("A100 SXM 80GB", 2.039e12, 19.5e12, 312e12),
    GPU("RTX 4090", 1.008e12, 82.6e12, 165.2e12),
)
LAUNCH_S = 5e-6  # assumed eager PyTorch cost of one operator on a fast host (launch + dispatch)


def op_seconds(op, gpu: GPU) -> float:
    """Roofline time of one counted operator on `gpu`."""
    _, moved, flops, matmul_dtype = op
    rate = gpu.tensor if matmul_dtype in (torch.bfloat16, torch.float16) else gpu.fp32
    return max(moved / gpu.bandwidth, flops / rate)


def step_seconds(work: dict, gpu: GPU, launch_s: float = LAUNCH_S) -> dict:
    """{"engine": Σ roofline times, "eager": Σ max(roofline time, launch_s)} of one step's counted operators."""
    times = [op_seconds(op, gpu) for op in work["ops"]]
    return {"engine": sum(times), "eager": sum(max(t, launch_s) for t in times)}


def predict_curve(original: dict, release: dict, gpus=GPUS, launch_s: float = LAUNCH_S) -> list[dict]:
    """Per batch size (the keys both `original` and `release` hold: {batch: step_work}) the machine-independent
    ratios and, per GPU, the predicted slowdowns (release step time / original's) "engine" and "eager"."""
    rows = []
    for batch in sorted(set(original) & set(release)):
        o, r = original[batch], release[batch]
        row = {"batch": batch, "bytes_ratio": r["bytes"] / o["bytes"], "flops_ratio": r["flops"] / o["flops"],
               "matmul_flops_ratio": r["matmul_flops"] / o["matmul_flops"], "kernels_ratio": r["kernels"] / o["kernels"],
               "release_syncs": r["syncs"], "original_syncs": o["syncs"], "gpus": {}}
        for gpu in gpus:
            to, tr = step_seconds(o, gpu, launch_s), step_seconds(r, gpu, launch_s)
            row["gpus"][gpu.name] = {k: tr[k] / to[k] for k in ("engine", "eager")}
        rows.append(row)
    return rows


def format_prediction(name: str, rows: list[dict], gpus=GPUS) -> list[str]:
    """Markdown table rows for one release's predicted curve (cells: engine / eager)."""
    head = ["batch", "bytes ratio", "FLOPs ratio (matmul + elementwise)", "kernels ratio"] + [g.name for g in gpus]
    lines = [f"**{name}** (PREDICTED slowdown, release / original; each GPU: engine / eager)", "",
             "| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for row in rows:
        cells = [str(row["batch"]), f"{row['bytes_ratio']:.2f}x", f"{row['flops_ratio']:.2f}x",
                 f"{row['kernels_ratio']:.2f}x"]
        cells += [f"{row['gpus'][g.name]['engine']:.2f}x / {row['gpus'][g.name]['eager']:.2f}x" for g in gpus]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
