"""Parity with upstream BAGEL: runs tests/parity/upstream_parity.py against a prepared upstream checkout.

Enable with COOPER_UPSTREAM_DIR=/path/to/Bagel (a clone of ByteDance-Seed/Bagel prepared with
`python tests/parity/upstream_shims.py /path/to/Bagel`, see the docstring of upstream_parity.py).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REFERENCE, ROOT

UPSTREAM = os.environ.get("COOPER_UPSTREAM_DIR")
CHECKPOINT = REFERENCE / "bagel-tiny-ckpt"


@pytest.mark.skipif(not UPSTREAM, reason="COOPER_UPSTREAM_DIR is not set: no upstream BAGEL checkout to compare "
                                         "against (see tests/parity/upstream_parity.py for how to prepare one)")
def test_matches_upstream_bagel():
    if not (CHECKPOINT / "ema.safetensors").is_file():
        pytest.skip(f"{CHECKPOINT}: upstream-written tiny checkpoint not found")
    upstream = Path(UPSTREAM)
    assert upstream.is_dir(), f"COOPER_UPSTREAM_DIR={UPSTREAM} is not a directory"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "parity" / "upstream_parity.py"), "--upstream", str(upstream),
         "--checkpoint", str(CHECKPOINT)],
        capture_output=True, text=True, timeout=900, cwd=str(ROOT),
    )
    report = proc.stdout + ("\n" + proc.stderr[-4000:] if proc.returncode else "")
    print(report)
    assert proc.returncode == 0, f"upstream parity failed (exit {proc.returncode}):\n{report}"
