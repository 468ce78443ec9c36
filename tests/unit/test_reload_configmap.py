"""Policies mounted from a Kubernetes ConfigMap: the kubelet's layout and its atomic update.

The kubelet (no Kubernetes here) keeps the files in a `..<timestamp>/` directory, points the
`..data` symlink at it and exposes each file as a symlink through `..data`; an update writes a
new directory and renames a fresh symlink over `..data`. The test builds that layout with real
symlinks and performs the swap the same way, against the real file watcher.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

from policy_engine.policy.compiler import load_bundle
from policy_engine.policy.reload import BundleHolder, ReloadResult
from tests.conftest import POLICIES


def write_version(mount: Path, name: str, weight: int) -> Path:
    """A timestamped data directory holding the example policies, the canary at `weight`."""
    data = mount / name
    data.mkdir()
    for source in POLICIES.glob("*.yaml"):
        shutil.copy(source, data / source.name)
    canary = data / "canary.yaml"
    canary.write_text(canary.read_text().replace("weight: 10", f"weight: {weight}"))
    return data


def swap_data(mount: Path, target: str) -> None:
    temporary = mount / "..data_tmp"
    temporary.symlink_to(target)
    os.replace(temporary, mount / "..data")


def configmap_mount(tmp_path: Path) -> Path:
    mount = tmp_path / "policies"
    mount.mkdir()
    write_version(mount, "..2025_01_01_00_00_00.1", 10)
    swap_data(mount, "..2025_01_01_00_00_00.1")
    for source in POLICIES.glob("*.yaml"):
        (mount / source.name).symlink_to(Path("..data") / source.name)
    return mount


def canary_weight(holder: BundleHolder) -> int:
    return holder.pipeline.bundle.canary[0].weight


def test_a_configmap_mount_loads_each_policy_once(tmp_path: Path) -> None:
    mount = configmap_mount(tmp_path)
    bundle = load_bundle(mount)
    assert bundle.version == load_bundle(POLICIES).version


def test_the_watcher_reloads_on_the_data_symlink_swap(tmp_path: Path) -> None:
    mount = configmap_mount(tmp_path)
    results: list[ReloadResult] = []
    holder = BundleHolder(mount, on_reload=results.append)
    assert canary_weight(holder) == 10

    async def scenario() -> None:
        stop = asyncio.Event()
        watcher = asyncio.create_task(holder.watch(stop, debounce_ms=50))
        try:
            # The watcher is live once a change under a hidden directory (ignored by the loader,
            # seen by the watcher) produces a reload.
            probe = mount / ".probe"
            probe.mkdir()
            deadline = time.monotonic() + 60
            while not results:
                assert time.monotonic() < deadline, "the watcher never reported a change"
                (probe / "touch.yaml").write_text(str(time.monotonic()))
                await asyncio.sleep(0.2)
            # New data first, then, once the watcher is quiet, only the swap: the reload that
            # brings the new policies must come from the swap. (The watcher may see the writes,
            # or miss files written before it watches the new directory: either is fine.)
            write_version(mount, "..2025_01_01_00_01_00.2", 20)
            seen, quiet_since, deadline = len(results), time.monotonic(), time.monotonic() + 60
            while time.monotonic() - quiet_since < 1.0 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                if len(results) != seen:
                    seen, quiet_since = len(results), time.monotonic()
            assert canary_weight(holder) == 10, "the new data is not visible before the swap"
            swap_data(mount, "..2025_01_01_00_01_00.2")
            deadline = time.monotonic() + 60
            while canary_weight(holder) != 20:
                assert time.monotonic() < deadline, "the ..data swap did not reload the policies"
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await asyncio.wait_for(watcher, 30)

    asyncio.run(scenario())
    assert all(result.ok for result in results)
