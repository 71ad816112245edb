"""predict.py: the machine-independent work of one decode step, and the roofline that turns it into a predicted
slowdown on a GPU (issue 17, item 5).  Tiny random Llama; the work is checked against counts made by hand from
its shapes, the roofline against its limits (all bandwidth-bound, all compute-bound, all launch-bound)."""

import copy

import pytest
import torch

from taylormlp.measure import predict
from taylormlp.protection.calibration import collect_ranges
from taylormlp.protection.options import ProtectOptions
from taylormlp.protection.protector import Protector

from conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = torch.tensor([[3, 17, 9, 44, 101, 2, 7, 60]])
HIDDEN, INTER, LAYERS, VOCAB, HEADS, KV_HEADS = 32, 64, 2, 128, 4, 2


@pytest.fixture(scope="module")
def models():
    base = tiny_llama()
    gen = torch.Generator().manual_seed(1)
    ranges = collect_ranges(base, [torch.randint(0, VOCAB, (20,), generator=gen) for _ in range(4)])
    release = copy.deepcopy(base)
    Protector(release, ranges, ProtectOptions(preset="default", order=6, coverage=1.0, max_pieces=1).resolved()
              ).apply(1.0)
    return base, release


def linear_macs() -> int:
    """Multiply-adds of the tiny Llama's linear layers per token, by hand: q, k, v, o, gate, up, down, lm_head."""
    head = HIDDEN // HEADS
    attention = HIDDEN * HIDDEN * 2 + 2 * HIDDEN * KV_HEADS * head
    return LAYERS * (attention + 3 * HIDDEN * INTER) + HIDDEN * VOCAB


def test_step_work_counts_the_matmuls_of_one_step(models):
    base, _ = models
    context = PROMPT.shape[1] + 1
    attention = LAYERS * 4 * HEADS * context * (HIDDEN // HEADS)  # q·K and p·V over the context, per token
    for batch in (1, 3):
        work = predict.step_work(base, PROMPT, batch)
        assert work["matmul_flops"] == batch * (2 * linear_macs() + attention)
        assert work["flops"] > work["matmul_flops"] and work["kernels"] == len(work["ops"]) > 10
        # every weight is read once per step, plus activations (the embedding table is not a weight read: untied)
        weights = 4 * (LAYERS * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * HIDDEN // 2 + 3 * HIDDEN * INTER) + HIDDEN * VOCAB)
        assert weights < work["bytes"] < 2 * weights
        # the lookup reads the rows it returns (and the token ids), not the whole table
        lookup = [op for op in work["ops"] if op[0] == "embedding"]
        assert [op[1] for op in lookup] == [2 * batch * HIDDEN * 4 + batch * 8]


def test_release_step_does_the_series_work(models):
    base, release = models
    o, r = predict.step_work(base, PROMPT, 2), predict.step_work(release, PROMPT, 2)
    mlp = release.model.layers[0].mlp
    extra = sum(m.hidden * ((m.order + 1) * m.pieces - m.protected) for m in (l.mlp for l in release.model.layers))
    assert r["matmul_flops"] - o["matmul_flops"] == 2 * 2 * extra  # the Θ matmuls replace the down projections
    assert r["bytes"] - o["bytes"] > 4 * extra  # the extra Θ values, read once, plus the features' traffic
    assert r["flops"] - r["matmul_flops"] > o["flops"] - o["matmul_flops"] + 2 * (mlp.order + 1) * mlp.pieces
    assert r["kernels"] > o["kernels"] and r["syncs"] >= LAYERS  # one host sync per layer (excess.any())


def test_roofline_limits(models):
    base, release = models
    o = {b: predict.step_work(base, PROMPT, b) for b in (1, 4)}
    r = {b: predict.step_work(release, PROMPT, b) for b in (1, 4)}
    memory = predict.GPU("memory-bound", 1e9, 1e30, 1e30)
    compute = predict.GPU("compute-bound", 1e30, 1e9, 1e9)
    rows = predict.predict_curve(o, r, gpus=(memory, compute), launch_s=0.0)
    assert [row["batch"] for row in rows] == [1, 4]
    for row in rows:
        b = row["batch"]
        assert row["gpus"]["memory-bound"]["engine"] == pytest.approx(r[b]["bytes"] / o[b]["bytes"])
        assert row["gpus"]["compute-bound"]["engine"] == pytest.approx(r[b]["flops"] / o[b]["flops"])
        assert row["gpus"]["memory-bound"]["eager"] == row["gpus"]["memory-bound"]["engine"]  # no launch cost
    launch = predict.predict_curve(o, r, gpus=(predict.GPU("fast", 1e30, 1e30, 1e30),), launch_s=1e-3)
    assert launch[0]["gpus"]["fast"]["eager"] == pytest.approx(r[1]["kernels"] / o[1]["kernels"])
    table = "\n".join(predict.format_prediction("rel", rows, gpus=(memory, compute)))
    assert "PREDICTED" in table and table.count("\n| ") == 1 + 1 + len(rows)
