"""Hot reload keeps the last good bundle through every kind of bad change, and keeps watching."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from policy_engine.policy import reload as reload_module
from policy_engine.policy.compiler import NO_ACCESS_POLICY
from policy_engine.policy.reload import BundleHolder, ReloadResult
from tests.conftest import POLICIES


def test_removing_the_access_policies_is_a_bad_change(policy_copy: Path) -> None:
    """An emptied directory or a deleted access.yaml would allow every request: refused."""
    holder = BundleHolder(policy_copy)
    good = holder.version
    (policy_copy / "access.yaml").unlink()
    result = holder.reload()
    assert not result.ok and holder.version == good
    assert [issue.message for issue in result.issues] == [NO_ACCESS_POLICY]
    assert str(result.issues[0].position) == str(policy_copy)
    for path in policy_copy.iterdir():
        path.unlink()
    assert not holder.reload().ok and holder.version == good
    shutil.copy(POLICIES / "access.yaml", policy_copy)
    assert holder.reload().ok and holder.pipeline.bundle.access


def test_a_loader_failure_is_reported_and_the_watch_goes_on(
    policy_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception the loader should never raise (a bug): the watcher logs it, keeps the
    bundle, and still reloads the next change. The failure is injected into the loader; the
    watcher, the files and the reload are real."""
    real = reload_module.load_bundle
    failures = [RecursionError("maximum recursion depth exceeded")]

    def loader(directory: Path) -> object:
        if failures:
            raise failures.pop()
        return real(directory)

    results: list[ReloadResult] = []
    holder = BundleHolder(policy_copy, on_reload=results.append)
    monkeypatch.setattr(reload_module, "load_bundle", loader)
    quotas = policy_copy / "quotas.yaml"

    def free_limit() -> int:
        (limit,) = [
            b.limit
            for q in holder.pipeline.bundle.quota
            for lim in q.limits
            if lim.name == "free-requests"
            for b in lim.budgets
        ]
        return int(limit)

    async def scenario() -> None:
        stop = asyncio.Event()
        watcher = asyncio.create_task(holder.watch(stop, debounce_ms=50))
        try:
            deadline = time.monotonic() + 60
            while not results:  # the failing load: the first change the watcher sees
                assert time.monotonic() < deadline, "the watcher never reported a change"
                quotas.write_text(quotas.read_text().replace("limit: 20,", "limit: 30,", 1))
                await asyncio.sleep(0.2)
            assert results[0] == ReloadResult(False, holder.version) and free_limit() == 20
            deadline = time.monotonic() + 60
            while free_limit() != 30:
                assert time.monotonic() < deadline, "the watch ended with the failure"
                quotas.write_text(quotas.read_text() + "\n")
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            await asyncio.wait_for(watcher, 30)

    asyncio.run(scenario())


def test_the_last_good_copy_is_what_was_loaded(policy_copy: Path, tmp_path: Path) -> None:
    """The copy a replacement worker would start from holds the files as they were loaded; an
    edit between the load and the copy leaves no copy rather than a wrong one."""
    from policy_engine.policy.compiler import content_version, load_bundle
    from policy_engine.policy.reload import LastGood

    kept = tmp_path / "kept"
    kept.mkdir()
    last_good = LastGood(kept)
    bundle = load_bundle(policy_copy)
    quotas = policy_copy / "quotas.yaml"
    original = quotas.read_text()
    quotas.write_text(original.replace("limit: 20,", "limit: 30,", 1))
    last_good.keep(bundle)
    assert last_good.directory() is None and [p.name for p in kept.iterdir()] == []
    quotas.write_text(original)
    last_good.keep(bundle)
    copy = last_good.directory()
    assert copy is not None and content_version(copy) == bundle.version == load_bundle(copy).version
    assert not (copy / "quotas_test.yaml").exists()  # the policies, not their tests


def test_only_the_current_copy_is_kept_and_an_older_load_does_not_replace_it(
    policy_copy: Path, tmp_path: Path
) -> None:
    from policy_engine.policy.compiler import load_bundle
    from policy_engine.policy.reload import LastGood

    kept = tmp_path / "kept"
    kept.mkdir()
    last_good = LastGood(kept)
    older = load_bundle(policy_copy)
    last_good.keep(older)
    quotas = policy_copy / "quotas.yaml"
    quotas.write_text(quotas.read_text().replace("limit: 20,", "limit: 30,", 1))
    newer = load_bundle(policy_copy)
    last_good.keep(newer)
    assert sorted(p.name for p in kept.iterdir()) == sorted(["current", newer.version])
    last_good.keep(older)  # a slow worker's load, finished after the directory changed
    assert last_good.directory() == kept / newer.version
