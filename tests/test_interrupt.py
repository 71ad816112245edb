"""A protect run killed with SIGKILL leaves nothing that load_release accepts, and nothing half-written at --out.

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
from taylormlp.errors import TaylorMLPError


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


@pytest.mark.parametrize("phase", ["calibrating", "writing"])
def test_sigkill_leaves_nothing_loadable(tiny_llama_dir, tmp_path, phase):
    work, scratch = tmp_path / "work", tmp_path / "scratch"
    work.mkdir()
    scratch.mkdir()
    out = work / "rel"
    proc, seen = _start(tiny_llama_dir, out, scratch)
    deadline = time.time() + 300

    def reached():
        if phase == "calibrating":
            return b"calibration prose" in seen
        return any(any(tmp.iterdir()) for tmp in work.glob(".rel.tmp-*"))

    try:
        while time.time() < deadline and proc.poll() is None and not reached():
            time.sleep(0.001)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert reached(), f"the run never got to {phase} (exit {proc.returncode}): {bytes(seen)[-2000:]!r}"
    assert alive and proc.returncode == -signal.SIGKILL, "the kill must land while the run is still at work"
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
