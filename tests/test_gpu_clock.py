"""The benchmark's clock log: nvidia-smi's samples read back, and no failure without it."""

from __future__ import annotations

import json
import sys

import torch

from moelab.bench.__main__ import main
from moelab.bench.gpu_clock import ClockLog, clock_log, clock_text, parse

SAMPLES = """\
1980, 119.38, 0x0000000000000000
345, 77.35, 0x0000000000000001
1560, 709.44, 0x0000000000000004
[N/A], 80.00, 0x0000000000000000
Failed to read a field
1650, 698.31, 0x0000000000000004
"""


def test_samples_are_read_and_idle_is_not_throttling():
    assert parse(SAMPLES) == [
        (1980.0, 119.38, False),
        (345.0, 77.35, False),  # 0x1: idle, the clock is low for want of work
        (1560.0, 709.44, True),  # 0x4: the software power cap
        (1650.0, 698.31, True),
    ]


def test_a_log_summarises_what_the_sampler_printed():
    script = f"import sys, time; sys.stdout.write({SAMPLES!r}); sys.stdout.flush(); time.sleep(60)"
    with ClockLog(0, command=[sys.executable, "-c", script]) as log:
        pass
    # median of 1980, 345, 1560, 1650; three of the four samples had no throttle bit but idle
    assert log.summary() == dict(sm_mhz=1605, sm_mhz_min=345, power_w_max=709.4, throttled=0.5)


def test_a_table_cell_marks_throttled_rows():
    assert clock_text(None) == "n/a"
    boost = dict(sm_mhz=1980, sm_mhz_min=1980, power_w_max=120.0, throttled=0.0)
    capped = dict(sm_mhz=1650, sm_mhz_min=1305, power_w_max=702.0, throttled=0.9)
    assert clock_text(boost) == "1980" and clock_text(capped) == "1650*"


def test_no_sampler_means_no_summary_and_no_failure(tmp_path):
    with ClockLog(0, command=[str(tmp_path / "no-such-nvidia-smi")]) as log:
        pass
    assert log.summary() is None
    with ClockLog(None) as log:  # not a GPU
        pass
    assert log.summary() is None
    with clock_log(torch.device("cpu")) as log:
        pass
    assert log.command is None and log.summary() is None


def test_experts_rows_carry_their_clock_and_a_sustained_time(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["experts", "--shape", "tiny", "--tokens", "16", "--iters", "1", "--mode", "full",
            "--backends", "native_torch", "--device", "cpu", "--sustain", "3",
            "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    (row,) = json.loads(out.read_text())
    assert row["clock"] is None and row["sustained_clock"] is None  # no GPU clock on the CPU
    assert row["sustained_ms"] > 0
    table = capsys.readouterr().out
    assert "sustained" in table and "SM MHz" in table
