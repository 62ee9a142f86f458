"""bench.py's own options: bad values are one line and exit 2 before any measuring starts.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_bench.py
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("option, message", [
    ("--dtypes=float16", "--dtypes=float16 is not a list of float32 and bfloat16"),
    ("--dtypes=", "--dtypes= is not a list of float32 and bfloat16"),
    ("--baseline_dir=no/such/checkout", "has no train.py; point it at a checkout of this repository"),
    ("--time_to_loss", "--time_to_loss compares with nanoGPT: give --nanogpt_dir=DIR"),
])
def test_bad_options_are_one_line_and_exit_2_before_measuring(tmp_path, option, message):
    done = subprocess.run([sys.executable, str(REPO / "bench.py"), option, f"--out={tmp_path / 'bench.json'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert "matmul peak" not in done.stdout + done.stderr and not (tmp_path / "bench.json").exists()
