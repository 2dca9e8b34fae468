"""What the GPU's clock did while a benchmark row ran, sampled by ``nvidia-smi`` beside it.

Back-to-back steps of a dense MoE block bring an H200 to its 700 W power cap within about
0.1 s, after which the SM clock sits at 1260-1850 MHz instead of 1980 (BENCHMARKS.md, runs
112-113). A row's time then depends on the power state it started in: the anchor's protocol (3
warm-ups, median of 10-20 steps) times mostly boost-clock steps after an idle gap and throttled
ones after heavy work. Each timed row therefore records the clock it ran at.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence

import torch

QUERY = "clocks.sm,power.draw,clocks_throttle_reasons.active"


class ClockLog:
    """``with ClockLog(index) as log: ...`` samples the SM clock (MHz), board power (W) and
    throttle reasons of GPU ``index`` every ``period_ms`` while the block runs; then
    :meth:`summary`. Without ``nvidia-smi`` (or when it fails), or with ``index`` None (not a
    GPU), it samples nothing and the summary is None: a benchmark never fails for want of it.
    ``command`` replaces the ``nvidia-smi`` call (tests)."""

    def __init__(
        self, index: int | None, period_ms: int = 50, command: Sequence[str] | None = None
    ):
        if command is None and index is not None and shutil.which("nvidia-smi") is not None:
            command = ("nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                       f"--id={index}", f"-lms={period_ms}")  # fmt: skip
        self.command = command
        self.samples: list[tuple[float, float, bool]] = []
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> ClockLog:
        if self.command is not None:
            try:
                # fmt: off
                self._process = subprocess.Popen(self.command, stdout=subprocess.PIPE,
                                                 stderr=subprocess.DEVNULL, text=True)
                # fmt: on
            except OSError:
                self._process = None
            else:
                time.sleep(0.05)  # nvidia-smi's first sample, before the timed work starts
        return self

    def __exit__(self, *exc) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            out, _ = self._process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            out, _ = self._process.communicate()
        self.samples = parse(out)

    def summary(self) -> dict | None:
        """``sm_mhz`` (median), ``sm_mhz_min``, ``power_w_max`` and ``throttled`` (the fraction
        of samples with a throttle reason set), or None without samples."""
        if not self.samples:
            return None
        clocks = [s[0] for s in self.samples]
        return dict(
            sm_mhz=round(statistics.median(clocks)),
            sm_mhz_min=round(min(clocks)),
            power_w_max=round(max(s[1] for s in self.samples), 1),
            throttled=round(sum(s[2] for s in self.samples) / len(self.samples), 2),
        )


def clock_log(device: torch.device) -> ClockLog:
    """A :class:`ClockLog` of ``device`` (of the current GPU for a bare ``cuda``; one that
    samples nothing off CUDA)."""
    if device.type != "cuda":
        return ClockLog(None)
    return ClockLog(device.index if device.index is not None else torch.cuda.current_device())


def clock_text(clock: dict | None) -> str:
    """A table cell for :meth:`ClockLog.summary`: the median MHz, ``*`` when throttled."""
    if clock is None:
        return "n/a"
    return f"{clock['sm_mhz']}{'*' if clock['throttled'] else ''}"


def parse(text: str) -> list[tuple[float, float, bool]]:
    """``(sm MHz, power W, throttled)`` per line of ``nvidia-smi --query-gpu=QUERY
    --format=csv,noheader,nounits``; lines it cannot read (``[N/A]``, warnings) are skipped.
    Throttled means any reason bit but 0x1 (idle: the clock is low because there is no work)."""
    samples = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3:
            continue
        try:
            clock, power, reasons = float(fields[0]), float(fields[1]), int(fields[2], 16)
        except ValueError:
            continue
        samples.append((clock, power, bool(reasons & ~1)))
    return samples
