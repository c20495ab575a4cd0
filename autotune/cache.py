"""Persistent tuning cache: one JSON file mapping a tuning key to the winning config.

The key is ``kernel|device name|triton version|shape bucket|dtype`` (see ``tuning_key``), so a cache
file can be shared between machines and upgrades without returning a config tuned elsewhere.
Location: ``$KFOPT_AUTOTUNE_CACHE`` if set, else ``$XDG_CACHE_HOME/kfopt/autotune.json`` (default
``~/.cache/kfopt/autotune.json``).

Concurrent writers (several ranks of one job tuning at once) are safe: a writer takes an exclusive
``flock`` on ``<file>.lock``, re-reads the file, merges its entry, writes a temporary file in the same
folder and renames it over the old one, so readers only ever see a whole file.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import warnings
from pathlib import Path

CACHE_ENV = "KFOPT_AUTOTUNE_CACHE"


def default_cache_path() -> Path:
    """The cache file named by the environment (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kfopt" / "autotune.json"


def tuning_key(kernel: str, device_name: str, triton_version: str, bucket: tuple, dtype: str) -> str:
    """The cache key of one tuning decision."""
    shape = "x".join(str(int(b)) for b in bucket)
    return f"{kernel}|{device_name}|triton-{triton_version}|{shape}|{dtype}"


class TuningCache:
    """A JSON file of ``{key: {"config": {...}, "timings_ms": {...}}}`` entries, read lazily."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_cache_path()
        self._entries: dict | None = None

    def _read_file(self) -> dict:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as err:
            warnings.warn(f"kfopt autotune cache {self.path} is unreadable ({err}); tuning afresh")
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> dict | None:
        """The entry for ``key``; re-reads the file on a miss (another process may have tuned it)."""
        if self._entries is None or key not in self._entries:
            self._entries = self._read_file()
        return self._entries.get(key)

    def put(self, key: str, entry: dict) -> None:
        """Store ``entry`` under ``key``, merging with whatever other writers stored meanwhile."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                entries = self._read_file()
                entries[key] = entry
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump(entries, f, indent=1, sort_keys=True)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.path)
                except BaseException:
                    os.unlink(tmp)
                    raise
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self._entries = entries


_caches: dict[Path, TuningCache] = {}


def get_cache() -> TuningCache:
    """The process-wide cache for the path the environment names now."""
    path = default_cache_path()
    if path not in _caches:
        _caches[path] = TuningCache(path)
    return _caches[path]
