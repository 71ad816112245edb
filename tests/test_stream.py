"""The streamed model (issue 9): layers onloaded per forward, faithful to the in-memory path, clear loader errors."""

import json
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from taylormlp import load_release
from taylormlp.protection.calibration import RangeRecorder, collect_ranges
from taylormlp.cli import main
from taylormlp.protection.calibration import calibrate
from taylormlp.protection.flow import protect
from taylormlp.protection.options import ProtectOptions
from taylormlp.common.errors import TaylorMLPError
from taylormlp.protection.flow import protect_to_release
from taylormlp.release.sources import load_base
from taylormlp.release import stream
from taylormlp.release.stream import SafetensorsSource, open_streamed
from taylormlp.common.machine import resolve_device

from conftest import FAST


def test_streamed_forward_equals_full_model_and_holds_no_layer(tiny_llama_dir, tmp_path):
    full, _, _ = load_base(tiny_llama_dir)
    streamed, _ = open_streamed(tiny_llama_dir, torch.float32, "cpu", tmp_path)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, full(ids).logits)
        g_full = full.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        g_str = streamed.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(g_full, g_str)
    # after the forward, no decoder layer keeps its weights in memory
    for layer in streamed.model.layers:
        assert all(p.device.type == "meta" for p in layer.parameters())
    assert streamed.model.embed_tokens.weight.device.type == "cpu"


def test_padded_batches_record_the_same_ranges_as_one_sequence_at_a_time(tiny_llama_dir):
    model, _, _ = load_base(tiny_llama_dir)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 1000, (n,), generator=gen) for n in (5, 17, 9, 30, 2)]
    batched = collect_ranges(model, seqs, max_tokens=64)  # several padded batches
    single = [collect_ranges(model, [s], max_tokens=10_000) for s in seqs]
    lo = [np.min([r.lo[i] for r in single], axis=0) for i in range(len(batched.lo))]
    hi = [np.max([r.hi[i] for r in single], axis=0) for i in range(len(batched.hi))]
    for i in range(len(lo)):
        np.testing.assert_allclose(batched.lo[i], lo[i], atol=1e-5)
        np.testing.assert_allclose(batched.hi[i], hi[i], atol=1e-5)
    assert batched.tokens == sum(len(s) for s in seqs)  # padding is not counted


def test_recorder_leaves_out_tokens_after_eos(tiny_llama_dir):
    model, tok, _ = load_base(tiny_llama_dir)
    ids = torch.tensor([[5, 6, 7]])
    eos = int(model(ids).logits[0, -1].argmax())  # the first generated token is "EOS" for this recorder
    with RangeRecorder(model, eos_ids={eos}) as rec:
        rec.new_batch()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                       do_sample=False, pad_token_id=0)
    assert rec.tokens == 3 + 1  # the prompt and the EOS token itself; nothing generated after it


def test_streamed_release_matches_in_memory_protect(tiny_llama_dir, tmp_path):
    """The layer-streamed pipeline and the in-memory API produce the same protected model."""
    out = tmp_path / "streamed"
    protect_to_release(tiny_llama_dir, out, preset="paper", coverage=0.6, **FAST)
    model, tok, _ = load_base(tiny_llama_dir)
    protect(model, tok, options=ProtectOptions(preset="paper", coverage=0.6, **FAST))
    release = load_release(out)
    spec = json.loads((out / "config.json").read_text())["taylormlp"]
    assert spec["coverage"] == pytest.approx(model.config.taylormlp["coverage"])
    assert spec["layers"] == model.config.taylormlp["layers"]
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(release(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_calibration_samples_bound_the_work(tiny_llama_dir):
    model, tok, _ = load_base(tiny_llama_dir)
    data, ranges = calibrate(model, tok, None, ProtectOptions(calibration_samples=5, **FAST), chat=True)
    assert data.sources["python-stdlib-docstrings"] <= 5
    assert data.sources["prompts+continuations"] + data.sources["validation"] <= 5
    assert data.sources["validation"] == 1
    with pytest.raises(TaylorMLPError, match="calibration-samples"):
        ProtectOptions(calibration_samples=0).resolved()


def test_device_choice():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(TaylorMLPError, match="no CUDA GPU"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_streamed_protect_on_cuda(tiny_llama_dir, tmp_path):
    torch.cuda.reset_peak_memory_stats()
    check_streamed_protect_on("cuda", tiny_llama_dir, tmp_path)
    assert torch.cuda.max_memory_allocated() > 0  # the layers did run on the GPU


def check_streamed_protect_on(device, model_dir, tmp_path):
    """A release protected on `device` at full coverage: every channel of every layer in series form, its validation
    (run on that device) recorded, and its logits, loaded on the CPU, within the series' error of the original's on
    calibration-style prompts: Chebyshev order 8 is ~2e-5 of the largest logit here, a wrong Θ, sign, z0 or a
    layer left out is off by far more."""
    from taylormlp.protection.calibration import calibration_prompts
    from taylormlp.measure.generate import format_prompt
    from taylormlp.runtime import TaylorMLP

    out = tmp_path / device
    protect_to_release(model_dir, out, preset="default", coverage=1.0, device=device, **FAST)
    release = load_release(out)
    original, tok, _ = load_base(model_dir)
    spec = json.loads((out / "config.json").read_text())["taylormlp"]
    n, inter = original.config.num_hidden_layers, original.config.intermediate_size
    assert spec["coverage"] == 1.0
    assert [(layer["protected"], layer["rest"]) for layer in spec["layers"]] == [(inter, 0)] * n
    assert all(isinstance(layer.mlp, TaylorMLP) and layer.mlp.rest is None for layer in release.model.layers)
    validation = spec["validation"]
    assert validation["tokens"] > 0 and validation["max_logit_error"] < 1e-3, validation
    prompts = calibration_prompts()
    for text in [format_prompt(tok, p, True) for p in prompts["chat"][:2]] + prompts["raw"][:2]:
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            got, ref = release(ids).logits, original(ids).logits
        error = float((got - ref).abs().max())
        assert error < 1e-3 * float(ref.abs().max()), (text[:40], error)


# ---------------------------------------------------------------- a broken source file: one line, exit 2, nothing written


def _weights(model_dir):
    return model_dir / "model.safetensors"


def _truncate(d):
    w = _weights(d)
    w.write_bytes(w.read_bytes()[:-64])


def _garbage(d):
    _weights(d).write_bytes(b"this is not a safetensors file at all" * 10)


def _mislabel(d):
    w = _weights(d)
    data = w.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "F64" if header[name]["dtype"] != "F64" else "F32"
    raw = json.dumps(header).encode()
    raw += b" " * (n - len(raw)) if len(raw) <= n else b""
    w.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _bad_index(d):
    (d / "model.safetensors.index.json").write_text("{not json")


def _no_weights(d):
    _weights(d).unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80pickle")


def _bad_config(d):
    (d / "config.json").write_text("{\"model_type\": ")


@pytest.mark.parametrize("damage, message", [
    (_truncate, "model.safetensors"),
    (_garbage, "model.safetensors: not a safetensors file"),
    (_mislabel, "mislabelled|describes"),
    (_bad_index, "model.safetensors.index.json is not valid JSON"),
    (_no_weights, "no safetensors weights .*pytorch_model.bin"),
    (_bad_config, "config.json"),
])
def test_broken_source_is_one_clear_error(tiny_llama_dir, tmp_path, capsys, damage, message):
    src = tmp_path / "src"
    shutil.copytree(tiny_llama_dir, src)
    damage(src)
    out = tmp_path / "release"
    code = main(["protect", str(src), "--out", str(out), "--coverage", "0.5", "--calibration-samples", "3"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no temporary directory left behind


def test_source_reader_checks_every_file(tiny_llama_dir):
    source = SafetensorsSource(tiny_llama_dir)
    assert "model.layers.0.mlp.down_proj.weight" in source
    w = source.get("model.layers.0.mlp.down_proj.weight", torch.float64)
    assert w.dtype == torch.float64
    with pytest.raises(TaylorMLPError, match="not in the model's safetensors"):
        source.get("model.layers.9.mlp.down_proj.weight")


def test_rows_left_out_of_the_ranges_are_not_recorded(tiny_llama_dir):
    """Validation prompts share the generation batches with calibration prompts but never enter the ranges."""
    from taylormlp.measure.generate import greedy_sequences

    model, tok, _ = load_base(tiny_llama_dir)
    prompts = ["The sun is", "Water is made of hydrogen and oxygen, and"]
    with RangeRecorder(model) as both:
        greedy_sequences(model, tok, prompts, 4, recorder=both)
    with RangeRecorder(model) as first_only:
        seqs = greedy_sequences(model, tok, prompts, 4, recorder=first_only, record=[True, False])
    with RangeRecorder(model) as alone:
        greedy_sequences(model, tok, prompts[:1], 4, recorder=alone)
    assert first_only.tokens == alone.tokens < both.tokens
    assert first_only.tokens == len(seqs[0]["ids"]) - 1  # the last generated token is never fed back
    np.testing.assert_allclose(first_only.ranges().lo[0], alone.ranges().lo[0], atol=1e-5)


ALLOCATOR_PROBE = """
import sys, numpy as np
from taylormlp.common.machine import keep_mmap_threshold, proc_kb
if sys.argv[1] == "keep":
    keep_mmap_threshold()
big = np.ones(20 << 20, np.uint8)
del big  # glibc left to itself: its mmap threshold rises to 20 MiB here
base = proc_kb("/proc/self/status", "RssAnon")
blocks = [np.ones(1 << 20, np.uint8) for _ in range(64)]  # a layer's temporaries
last = blocks[-1]
del blocks  # freed, but below a block still in use: on the heap they cannot be handed back
print((proc_kb("/proc/self/status", "RssAnon") - base) >> 20)
"""


def test_streaming_keeps_freed_layer_temporaries_off_the_heap():
    """keep_mmap_threshold (called by every SafetensorsSource) hands freed 1 MiB blocks back to the OS; without it
    glibc keeps them after a larger block was freed, which is how peak memory grew with depth."""
    def extra_mib(mode):
        out = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE, mode], capture_output=True, text=True,
                             check=True)
        return int(out.stdout.split()[-1])

    assert extra_mib("keep") <= 8
    assert extra_mib("default") >= 32  # the probe does show glibc's growth, so the first line means something


def test_every_safetensors_source_keeps_the_mmap_threshold(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(stream, "keep_mmap_threshold", lambda: calls.append(True))
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    stream.SafetensorsSource(tmp_path)
    assert calls == [True]
