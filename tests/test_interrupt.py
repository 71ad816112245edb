"""A protect run killed with SIGKILL leaves nothing that load_release accepts, and nothing half-written at --out;
one stopped with SIGTERM removes its temporary directory as well.

Each run is killed at a point it is seen to have reached, while it is still running: mid-calibration (its progress
output shows the calibration prose being run), or mid-write (the temporary release directory beside --out exists
and already holds files)."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from taylormlp import load_release
from taylormlp.common.errors import TaylorMLPError


def _start(source, out, scratch):
    env = {k: v for k, v in os.environ.items() if k != "TAYLORMLP_QUIET"}  # progress on: it says how far the run is
    env["TMPDIR"] = str(scratch)  # the run's own scratch (offload folder) stays inside the test's directory
    proc = subprocess.Popen([sys.executable, "-m", "taylormlp.cli", "protect", str(source), "--out", str(out),
                             "--coverage", "0.5", "--order", "24"], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    seen = bytearray()

    def drain():  # progress bars end in "\r", not newlines: read whatever is there
        while chunk := proc.stderr.read1(65536):
            seen.extend(chunk)

    threading.Thread(target=drain, daemon=True).start()
    return proc, seen


def _signal_at(phase, sig, source, tmp_path):
    """Start a protect of `source`, send `sig` once it is seen at `phase`; the run's directory, output path, exit
    status, output, whether it was still running and whether it had got there when the signal went."""
    work, scratch = tmp_path / "work", tmp_path / "scratch"
    work.mkdir()
    scratch.mkdir()
    out = work / "rel"
    proc, seen = _start(source, out, scratch)
    deadline = time.time() + 300

    def reached():
        if phase == "calibrating":
            return b"calibration prose" in seen
        return any(any(tmp.iterdir()) for tmp in work.glob(".rel.tmp-*"))

    try:
        while time.time() < deadline and proc.poll() is None and not reached():
            time.sleep(0.001)
        alive, got_there = proc.poll() is None, reached()  # (a SIGTERM's cleanup removes what reached() sees)
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert got_there, f"the run never got to {phase} (exit {proc.returncode}): {bytes(seen)[-2000:]!r}"
    assert alive, "the signal must land while the run is still at work"
    return work, out, proc.returncode, bytes(seen)


@pytest.mark.parametrize("phase", ["calibrating", "writing"])
def test_sigkill_leaves_nothing_loadable(tiny_llama_dir, tmp_path, phase):
    work, out, code, _ = _signal_at(phase, signal.SIGKILL, tiny_llama_dir, tmp_path)
    assert code == -signal.SIGKILL
    leftovers = sorted(work.glob(".rel.tmp-*"))
    if phase == "calibrating":  # nothing was written yet, and nothing is
        assert sorted(p.name for p in work.iterdir()) == []
        with pytest.raises(TaylorMLPError):
            load_release(out)
    elif out.exists():  # the rename landed before the kill: then the release is complete, and nothing else is left
        load_release(out)
        assert leftovers == []
    else:  # killed mid-write: only the hidden temporary directory is left, and it is refused
        with pytest.raises(TaylorMLPError):
            load_release(out)
        assert len(leftovers) == 1 and sorted(p.name for p in work.iterdir()) == [leftovers[0].name]
        assert any(leftovers[0].iterdir())  # it did hold part of the release
        with pytest.raises(TaylorMLPError, match="not a complete taylormlp release"):
            load_release(leftovers[0])


@pytest.mark.parametrize("phase", ["calibrating", "writing"])
def test_sigterm_cleans_up(tiny_llama_dir, tmp_path, phase):
    """SIGTERM (kill, a scheduler, a container stop) is not SIGKILL: the run stops and removes what it was
    writing, so nothing is left beside --out, not even the hidden temporary directory."""
    work, out, code, seen = _signal_at(phase, signal.SIGTERM, tiny_llama_dir, tmp_path)
    if out.exists():  # the rename landed first: a complete release and nothing else
        load_release(out)
        assert sorted(p.name for p in work.iterdir()) == ["rel"]
    else:
        assert code == 128 + signal.SIGTERM, seen[-2000:]
        assert b"terminated; nothing was written" in seen
        assert sorted(p.name for p in work.iterdir()) == []  # the temporary directory is gone too
