from __future__ import annotations

from pathlib import Path

import pytest

from tests.infra.bicep import Infra

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"


@pytest.fixture(scope="session")
def infra() -> Infra:
    return Infra.load(INFRA)
