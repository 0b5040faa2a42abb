"""`python -m bench.runner_bench`: time one `dbt build` inside a Prefect flow, two ways.

- plain: `dbtRunner` in-process + its run results as a Prefect table artifact (what the flow uses)
- prefect-dbt: `PrefectDbtRunner`, which turns every dbt node into a Prefect task

Runs against whatever the env vars point to (CLICKHOUSE_*, PIPELINE_DBT_*), under Prefect's
test harness unless PREFECT_API_URL is set. The first run of each includes imports and parsing;
compare the medians of the others. Results are quoted in `flows/dbt_build.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

from prefect import flow

from flows.dbt_build import dbt_args, run_build, selectors
from flows.settings import FlowSettings
from flows.timings import TimingRecorder


def _settings() -> FlowSettings:
    return FlowSettings()


@flow(name="bench-plain-dbt-runner")
def plain() -> float:
    settings = _settings()
    t0 = time.perf_counter()
    build = run_build(settings, selectors(settings, settings.collections))
    recorder = TimingRecorder("bench")
    recorder.steps.extend(build.nodes)
    recorder.publish_artifact()
    return time.perf_counter() - t0


@flow(name="bench-prefect-dbt-runner")
def prefect_dbt() -> float:
    from prefect_dbt import PrefectDbtRunner
    from prefect_dbt.core.settings import PrefectDbtSettings

    settings = _settings()
    t0 = time.perf_counter()
    dbt_settings = PrefectDbtSettings(
        project_dir=settings.dbt_project_dir,
        **({"profiles_dir": settings.dbt_profiles_dir} if settings.dbt_profiles_dir else {}),
        **({"target_path": settings.dbt_target_path} if settings.dbt_target_path else {}),
    )
    args = dbt_args(settings, "build", selectors(settings, settings.collections))
    PrefectDbtRunner(settings=dbt_settings).invoke(["build", *args[args.index("--select") :]])
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.runner_bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args(argv)
    harness: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.testing.utilities import prefect_test_harness

        harness = prefect_test_harness(server_startup_timeout=180)
    with harness:
        times: dict[str, list[float]] = {"plain dbtRunner": [], "PrefectDbtRunner": []}
        for _ in range(args.runs):
            times["plain dbtRunner"].append(plain())
            times["PrefectDbtRunner"].append(prefect_dbt())
    for name, values in times.items():
        warm = values[1:] or values
        print(
            f"{name:>17}: runs {[round(v, 2) for v in values]} s; "
            f"median without the first {statistics.median(warm):.2f} s"
        )


if __name__ == "__main__":
    main()
