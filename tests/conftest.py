from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from policy_engine.decide.pipeline import Pipeline
from policy_engine.mesh.crds import CrdFileNotFoundError, CrdSchemas, load_crds
from policy_engine.policy.bundle import Bundle
from policy_engine.policy.compiler import load_bundle

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"


@pytest.fixture(scope="session")
def example_bundle() -> Bundle:
    return load_bundle(POLICIES)


@pytest.fixture(scope="session")
def example_pipeline(example_bundle: Bundle) -> Pipeline:
    return Pipeline(example_bundle)


@pytest.fixture
def policy_copy(tmp_path: Path) -> Path:
    """A private copy of the example policies, safe to break."""
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    return target


@pytest.fixture(scope="session")
def crds() -> CrdSchemas:
    """Istio's CRD schemas (reference data outside the project): missing is a failure, not a skip."""
    try:
        return load_crds()
    except CrdFileNotFoundError as error:
        pytest.fail(str(error), pytrace=False)
