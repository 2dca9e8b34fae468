"""Choices measured on this machine, kept on disk so that later processes skip the measuring.

One JSON file per kind of choice under ``$MOELAB_CACHE_DIR`` (default ``~/.cache/moelab``),
``{scope: {key: choice}}``: the scope names what the timing depends on (device, Triton and
torch versions), the key the problem. Writes go to a temporary file that replaces the old one,
so a crash mid-write never leaves a half file, under a lock on ``<file>.lock``, so processes
that measure at once (a Hydra multirun) keep each other's choices; an unreadable file, or one of
another layout, is ignored (and replaced on the next write) and an unwritable directory only
costs the measuring again next time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from moelab.files import replace_text

try:
    import fcntl
except ImportError:  # not on Windows: writers there may drop each other's new choices
    fcntl = None

log = logging.getLogger("moelab")
Choice = int | str


def cache_dir() -> Path:
    """``$MOELAB_CACHE_DIR`` (``~`` expanded) or ``~/.cache/moelab``, made absolute: a Hydra job
    may change the working directory between two uses."""
    folder = os.environ.get("MOELAB_CACHE_DIR") or "~/.cache/moelab"
    return Path(folder).expanduser().absolute()


class MeasuredChoices:
    """``get(scope, key, measure)``: the stored choice, else ``measure()``'s, stored. A stored
    value that is not one of ``allowed`` (another version's, or edited) is measured again."""

    def __init__(self, filename: str, allowed: tuple[Choice, ...]):
        self.filename = filename
        self.allowed = allowed
        self.chosen: dict[tuple[str, str], Choice] = {}
        self._asked: dict[tuple, Choice] = {}

    def path(self) -> Path:
        return cache_dir() / self.filename

    def _read(self) -> dict[str, dict]:
        """The stored ``{scope: {key: choice}}``; scopes of another layout are left out."""
        try:
            data = json.loads(self.path().read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("moelab: ignoring unreadable %s (%s)", self.path(), e)
            return {}
        if not isinstance(data, dict):
            return {}
        return {scope: keys for scope, keys in data.items() if isinstance(keys, dict)}

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

    def remembered(self, asked: tuple, lookup: Callable[[], Choice]) -> Choice:
        """``lookup()`` once per ``asked`` (the caller's own key objects) in this process: a
        step asks again at every launch, and building the text keys of :meth:`get` costs host
        time while the GPU waits."""
        if asked not in self._asked:
            self._asked[asked] = lookup()
        return self._asked[asked]

    def _write(self, scope: str, key: str, choice: Choice) -> None:
        path = self.path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _locked(path.with_name(path.name + ".lock")):
                data = self._read()  # other processes may have added choices meanwhile
                data.setdefault(scope, {})[key] = choice
                replace_text(path, json.dumps(data, indent=1, sort_keys=True))
        except OSError as e:
            log.warning("moelab: could not store a measured choice in %s (%s)", path, e)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive lock held for the block (none where ``fcntl`` is missing)."""
    if fcntl is None:
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
