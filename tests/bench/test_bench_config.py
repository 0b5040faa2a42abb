"""BENCH_* variables: a value the bench cannot use is an error naming the variable."""

from __future__ import annotations

import pytest

from bench.config import BenchConfig, ConfigError


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("BENCH_PORT_BASE", "abc", "is not an integer"),
        ("BENCH_PORT_BASE", "80", "is too small"),
        ("BENCH_PORT_BASE", "65534", "is too large"),  # the third port would be 65536
        ("BENCH_SCALE", "1e6", "is not an integer"),
        ("BENCH_REPEAT", "0", "is too small"),
        ("BENCH_WORKER_TIMEOUT", "١٠٠", "is not an integer"),
    ],
)
def test_a_bad_value_names_the_variable(name: str, value: str, why: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name}=.*{why}"):
        BenchConfig.from_env({name: value})


def test_good_values_are_read() -> None:
    cfg = BenchConfig.from_env({"BENCH_PORT_BASE": "65533", "BENCH_SCALE": "20_000"})
    assert (cfg.port_base, cfg.scale) == (65533, 20_000)


def test_the_loader_memory_ratio_is_measured_by_the_bench_against_its_target() -> None:
    # Memory ratios are measurements (`make bench`), not test assertions: a margin taken from
    # one observation on a shared machine fails at random.
    from bench.catalogue import new_comparisons

    ratio = new_comparisons()["loader_rss_full_vs_small"]

    assert (ratio.subject, ratio.baseline) == ("memory.loader_full", "memory.loader_small")
    assert (ratio.op, ratio.threshold) == ("<=", 1.3)


def test_a_comma_list_of_groups_is_read_from_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # pydantic-settings decodes set-typed env vars as JSON unless told not to (NoDecode).
    monkeypatch.setenv("BENCH_ONLY", "web, dbt")

    assert BenchConfig.from_env().groups == frozenset({"web", "dbt"})
