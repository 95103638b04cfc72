"""The scale-out defaults follow from Dataverse's service-protection limits (docs/sizing.md)."""

from __future__ import annotations

import json

from shared.settings import SETTINGS
from tests.infra.bicep import Infra
from tests.infra.conftest import INFRA

FLEX_MINIMUM_INSTANCES = 40  # Flex Consumption's lowest allowed maximumInstanceCount
CONCURRENT_LIMIT = 52  # concurrent requests per application user per web server


def test_maximum_instance_count_fits_one_users_concurrency_limit(infra: Infra) -> None:
    # The shared throttle lets every live instance keep at least one request in flight, so more
    # instances than the concurrency limit would guarantee 0x80072326 (concurrent) 429s.
    for template in (infra.main, infra["functionapp"]):
        default = template.default("maximumInstanceCount")
        assert FLEX_MINIMUM_INSTANCES <= default <= CONCURRENT_LIMIT, template.name


def test_per_instance_job_concurrency_is_documented() -> None:
    queues = json.loads((INFRA.parent / "host.json").read_text(encoding="utf-8"))["extensions"]["queues"]
    sizing = (INFRA.parent / "docs" / "sizing.md").read_text(encoding="utf-8")
    assert f"batchSize` {queues['batchSize']}" in sizing
    assert f"newBatchThreshold` {queues['newBatchThreshold']}" in sizing
    assert "maximumInstanceCount` 40" in sizing


def test_the_shared_throttle_is_on_by_default_in_infra(infra: Infra) -> None:
    default = {s.name: s.default for s in SETTINGS}["DATAVERSE_SHARED_THROTTLE"]
    assert infra.main.default("dataverseSharedThrottle") == default == "auto"
