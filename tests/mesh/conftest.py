"""Fixtures of the mesh tests: Istio's CRD schemas (reference data outside the project)."""

from __future__ import annotations

import pytest

from policy_engine.mesh.crds import CrdFileNotFoundError, CrdSchemas, load_crds


@pytest.fixture(scope="session")
def crds() -> CrdSchemas:
    try:
        return load_crds()
    except CrdFileNotFoundError as error:
        pytest.fail(str(error), pytrace=False)
