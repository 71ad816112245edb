"""A protect run killed with SIGKILL leaves nothing that load_release accepts."""

import os
import signal
import subprocess
import sys
import time

import pytest

from taylormlp import load_release
from taylormlp.errors import TaylorMLPError


@pytest.mark.parametrize("delay", [0.0, 1.5])
def test_sigkill_leaves_nothing_loadable(tiny_llama_dir, tmp_path, delay):
    out = tmp_path / "rel"
    env = {**os.environ, "TAYLORMLP_QUIET": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "taylormlp.cli", "protect", str(tiny_llama_dir), "--out", str(out),
                             "--coverage", "0.5", "--order", "24"], env=env)
    deadline = time.time() + 120
    # kill once the temporary directory exists (mid-write), or `delay` seconds after it appears
    while time.time() < deadline and proc.poll() is None:
        if any(p.name.startswith(".rel.tmp-") for p in tmp_path.iterdir()):
            time.sleep(delay)
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():  # the rename happened before the kill: then the release must be complete
        load_release(out)
    else:
        with pytest.raises(TaylorMLPError):
            load_release(out)
    for leftover in tmp_path.glob(".rel.tmp-*"):
        with pytest.raises(TaylorMLPError, match="not a complete taylormlp release"):
            load_release(leftover)
