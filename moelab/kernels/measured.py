"""Choices measured on this machine, kept on disk so that later processes skip the measuring.

One JSON file per kind of choice under ``$MOELAB_CACHE_DIR`` (default ``~/.cache/moelab``),
``{scope: {key: choice}}``: the scope names what the timing depends on (device, Triton and
torch versions), the key the problem. Writes go to a temporary file that replaces the old one,
so a crash mid-write never leaves a half file; an unreadable file is ignored (and replaced on the
next write) and an unwritable directory only costs the measuring again next time.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("moelab")
Choice = int | str


def cache_dir() -> Path:
    return Path(os.environ.get("MOELAB_CACHE_DIR") or Path.home() / ".cache" / "moelab")


class MeasuredChoices:
    """``get(scope, key, measure)``: the stored choice, else ``measure()``'s, stored. A stored
    value that is not one of ``allowed`` (another version's, or edited) is measured again."""

    def __init__(self, filename: str, allowed: tuple[Choice, ...]):
        self.filename = filename
        self.allowed = allowed
        self.chosen: dict[tuple[str, str], Choice] = {}

    def path(self) -> Path:
        return cache_dir() / self.filename

    def _read(self) -> dict:
        try:
            data = json.loads(self.path().read_text())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("moelab: ignoring unreadable %s (%s)", self.path(), e)
            return {}

    def get(self, scope: str, key: str, measure: Callable[[], Choice]) -> Choice:
        if (scope, key) in self.chosen:
            return self.chosen[scope, key]
        stored = self._read().get(scope, {}).get(key)
        if stored in self.allowed:
            self.chosen[scope, key] = stored
            return stored
        choice = self.chosen[scope, key] = measure()
        self._write(scope, key, choice)
        return choice

    def _write(self, scope: str, key: str, choice: Choice) -> None:
        path = self.path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = self._read()  # other processes may have added choices meanwhile
            data.setdefault(scope, {})[key] = choice
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("moelab: could not store a measured choice in %s (%s)", path, e)
