"""Loading holds the parameters plus one tensor, not a second copy of the checkpoint."""

from __future__ import annotations

import argparse
import sys

import pytest

from moelab.bench import load_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])  # gpt_oss: MXFP4 experts on disk
def test_peak_rss_of_loading_stays_below_1_3x_the_parameters(tmp_path, family):
    row = load_memory.run(argparse.Namespace(gb=0.25, dir=str(tmp_path), family=family))
    assert row["param_bytes"] > 0.2 * 2**30
    assert row["ratio"] < 1.3
