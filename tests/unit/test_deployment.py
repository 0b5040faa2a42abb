"""The deployment is defined once, in prefect.yaml: `make serve` serves that definition, and
its interval knobs default to the file's intervals."""

from __future__ import annotations

import pytest

from flows.serve import deployment_spec
from flows.settings import FlowSettings


@pytest.fixture
def defaults(monkeypatch: pytest.MonkeyPatch) -> FlowSettings:
    for name in ("PIPELINE_SYNC_INTERVAL_MINUTES", "PIPELINE_RECONCILE_INTERVAL_MINUTES"):
        monkeypatch.delenv(name, raising=False)
    return FlowSettings()


def test_the_interval_knobs_default_to_the_intervals_of_prefect_yaml(
    defaults: FlowSettings,
) -> None:
    intervals = {s.reconciles: s.interval_seconds for s in deployment_spec().schedules}

    assert intervals == {
        False: defaults.sync_interval_minutes * 60,
        True: defaults.reconcile_interval_minutes * 60,
    }


def test_prefect_yaml_runs_one_flow_run_at_a_time() -> None:
    spec = deployment_spec()

    assert (spec.concurrency_limit, spec.collision_strategy) == (1, "ENQUEUE")
