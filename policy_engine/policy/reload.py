"""The active bundle, swapped atomically on a good change and kept on a bad one."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from policy_engine.decide.pipeline import Pipeline
from policy_engine.policy.bundle import Bundle
from policy_engine.policy.compiler import BundleError, content_version, is_test_file, load_bundle
from policy_engine.policy.source import Issue

log = logging.getLogger("policy_engine.reload")


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    version: str  # the active bundle's version after the attempt
    issues: tuple[Issue, ...] = ()


class LastGood:
    """A copy of the last good policy files, shared by a service's workers: a worker started
    while the directory holds a broken edit (one replacing a crashed worker) serves what the
    others serve instead of failing to start, over and over, until the supervisor gives up."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def keep(self, bundle: Bundle) -> None:
        """Make the bundle's files the current copy (the only one kept), unless the directory
        changed since they were loaded: a slower worker must not bring back an older version."""
        source, target = Path(bundle.directory), self.root / bundle.version
        if content_version(source) != bundle.version:
            return
        if not target.exists():
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
            for name in bundle.files:
                copy = staging / Path(name).relative_to(source)
                copy.parent.mkdir(parents=True, exist_ok=True)
                copy.write_bytes(Path(name).read_bytes())
            if content_version(staging) != bundle.version:
                shutil.rmtree(staging, ignore_errors=True)
                return
            try:
                staging.rename(target)
            except OSError:  # another worker kept the same version first
                shutil.rmtree(staging, ignore_errors=True)
        link = self.root / f".current-{os.getpid()}"
        link.unlink(missing_ok=True)
        link.symlink_to(bundle.version)
        os.replace(link, self.root / "current")
        # Older copies go (the directory is in memory in the chart, /tmp an emptyDir).
        for entry in self.root.iterdir():
            if entry.name not in (bundle.version, "current") and not entry.name.startswith("."):
                shutil.rmtree(entry, ignore_errors=True)

    def directory(self) -> Path | None:
        current = self.root / "current"
        return current.resolve() if current.exists() else None


class BundleHolder:
    """Readers take `holder.pipeline` once per request: a plain attribute read, no lock."""

    def __init__(
        self,
        directory: Path,
        on_reload: Callable[[ReloadResult], None] | None = None,
        last_good: LastGood | None = None,
    ) -> None:
        self.directory = directory
        self._last_good = last_good
        self.rejected: tuple[Issue, ...] = ()  # why the directory itself did not load at start
        try:
            bundle = load_bundle(directory)
        except BundleError as error:
            kept = last_good.directory() if last_good is not None else None
            if kept is None:
                raise  # a bad directory at the service's start is fatal
            bundle = load_bundle(kept)
            self.rejected = tuple(error.issues)
            for issue in error.issues:
                log.error("policies rejected, serving the last good bundle %s: %s", bundle.version, issue)
        self.pipeline = Pipeline(bundle)
        if not self.rejected:
            self._keep(bundle)
        self._on_reload = on_reload

    def _keep(self, bundle: Bundle) -> None:
        if self._last_good is None:
            return
        try:
            self._last_good.keep(bundle)
        except OSError as error:  # the copy is a fallback: serving goes on without it
            log.warning("cannot keep a copy of bundle %s: %s", bundle.version, error)

    @property
    def version(self) -> str:
        return self.pipeline.bundle.version

    def reload(self) -> ReloadResult:
        return self._settle(self._attempt())

    def _attempt(self) -> Bundle | ReloadResult:
        """The directory's bundle (its copy kept for the other workers), or the failed attempt
        (logged). Changes nothing the decisions read, so the watcher runs it in a thread: the
        event loop keeps answering while it compiles (more slowly: the GIL is shared)."""
        try:
            bundle = load_bundle(self.directory)
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
        self._keep(bundle)
        return bundle

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
