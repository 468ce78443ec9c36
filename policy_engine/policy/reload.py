"""The active bundle, swapped atomically on a good change and kept on a bad one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from policy_engine.decide.pipeline import Pipeline
from policy_engine.policy.bundle import Bundle
from policy_engine.policy.compiler import BundleError, is_test_file, load_bundle
from policy_engine.policy.source import Issue

log = logging.getLogger("policy_engine.reload")


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    version: str  # the active bundle's version after the attempt
    issues: tuple[Issue, ...] = ()


class BundleHolder:
    """Readers take `holder.pipeline` once per request: a plain attribute read, no lock."""

    def __init__(self, directory: Path, on_reload: Callable[[ReloadResult], None] | None = None) -> None:
        self.directory = directory
        self.pipeline = Pipeline(load_bundle(directory))  # a bad directory at start-up is fatal
        self._on_reload = on_reload

    @property
    def version(self) -> str:
        return self.pipeline.bundle.version

    def reload(self) -> ReloadResult:
        return self._settle(self._attempt())

    def _attempt(self) -> Bundle | ReloadResult:
        """The directory's bundle, or the failed attempt (logged). Changes nothing, so the
        watcher runs it in a thread: a slow load does not hold up decisions."""
        try:
            return load_bundle(self.directory)
        except BundleError as error:
            for issue in error.issues:
                log.error("policy reload rejected, keeping bundle %s: %s", self.version, issue)
            return ReloadResult(False, self.version, tuple(error.issues))
        except OSError as error:
            log.error("policy reload failed, keeping bundle %s: %s", self.version, error)
            return ReloadResult(False, self.version)
        except Exception:  # a loader bug must not end the watch: later edits still reload
            log.exception("policy reload failed, keeping bundle %s", self.version)
            return ReloadResult(False, self.version)

    def _settle(self, outcome: Bundle | ReloadResult) -> ReloadResult:
        if isinstance(outcome, ReloadResult):
            result = outcome
        else:
            if outcome.version != self.version:
                self.pipeline = Pipeline(outcome)
                log.info("policy bundle %s active (%d policies)", outcome.version, len(outcome.policies()))
            result = ReloadResult(True, self.version)
        if self._on_reload is not None:
            self._on_reload(result)
        return result

    async def watch(self, stop: asyncio.Event, debounce_ms: int = 200) -> None:
        """Reload on every change of a policy file until `stop` is set."""
        from watchfiles import awatch

        def relevant(_change: object, path: str) -> bool:
            p = Path(path)
            # A mounted ConfigMap changes by swapping its `..data` symlink to a new directory.
            return p.name == "..data" or (p.suffix in (".yaml", ".yml") and not is_test_file(p))

        async for _changes in awatch(
            self.directory, stop_event=stop, watch_filter=relevant, debounce=debounce_ms, recursive=True
        ):
            self._settle(await asyncio.to_thread(self._attempt))
