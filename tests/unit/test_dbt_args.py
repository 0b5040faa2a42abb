"""The dbt command line the flow builds: what the server lacks reaches the models as vars."""

from __future__ import annotations

import json

from flows.dbt_build import dbt_args
from flows.settings import FlowSettings
from loader.server_version import ServerVersion


def _vars(args: list[str]) -> dict[str, object] | None:
    return json.loads(args[args.index("--vars") + 1]) if "--vars" in args else None


def test_a_server_before_25_7_builds_the_models_without_patch_part_deletes() -> None:
    args = dbt_args(FlowSettings(), "build", [], ServerVersion.parse("25.3.6.56").dbt_vars())

    assert _vars(args) == {"task_events_patch_deletes": False}


def test_a_current_server_adds_no_vars() -> None:
    args = dbt_args(FlowSettings(), "build", [], ServerVersion.parse("26.9.1.1").dbt_vars())

    assert _vars(args) is None
