"""What a bench run does, read from environment variables.

- `BENCH_SCALE` (1000000): tasks in the main dataset; the memory comparison's small dataset
  has a tenth of them.
- `BENCH_REPEAT` (3): runs per measurement (1 is accepted, for the smoke test).
- `BENCH_DASHBOARD_RUNS` (50): page loads per dashboard latency measurement (and per page and
  mode of the `web` group).
- `BENCH_OUTPUT` (`bench/results/latest.json`): where the JSON report goes.
- `BENCH_DATA_DIR` (a new temp dir, removed afterwards): data of the bench's private stack.
- `BENCH_PORT_BASE` (free ports): first of three consecutive ports (mongo, clickhouse, redis),
  1024 to 65533.
- `BENCH_ONLY` / `BENCH_SKIP` (all / none): comma-separated measurement groups to run / to
  leave out; the groups are `GROUPS` below. A left-out group is still in the JSON, marked
  "unavailable: not selected".
- `BENCH_WORKER_TIMEOUT` (7200): seconds one measured subprocess may take.
- `BENCH_FRESHNESS_SECONDS` (10): seconds of steady writes per rate in the `freshness` group
  (50 and 500 writes/s); the issue's setting is 60 (with `BENCH_SCALE=1000000`).
- `BENCH_FRESHNESS_PROBES` (10): probe writes per second among them (each one latency sample).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, ValidationError
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
GROUPS: tuple[str, ...] = (
    "memory",
    "decode",
    "drain",
    "dlt",
    "seed_v1",
    "loader",
    "noop",
    "incremental",
    "dbt",
    "dashboard",
    "web",
    "freshness",
    "shards",
)


class ConfigError(ValueError):
    """A BENCH_* variable has a value the bench cannot use."""


def _bench_int(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    """A validator of an integer variable: ASCII digits (and `_`), within the bounds."""

    def check(value: Any) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            raw = str(value)
        else:
            raw = str(value).replace("_", "").strip()
        # ASCII digits only (int() would also take other scripts' digits, such as "٣").
        digits = raw[1:] if raw[:1] in "+-" else raw
        if not (digits.isascii() and digits.isdigit()):
            raise PydanticCustomError(
                "bench_int", "{value} is not an integer", {"value": repr(value)}
            )
        number = int(raw)
        if number < minimum:
            raise PydanticCustomError(
                "bench_int", "{n} is too small: use at least {m}", {"n": number, "m": minimum}
            )
        if maximum is not None and number > maximum:
            raise PydanticCustomError(
                "bench_int", "{n} is too large: use at most {m}", {"n": number, "m": maximum}
            )
        return number

    return check


def _groups(value: Any) -> frozenset[str]:
    if isinstance(value, str):
        value = value.split(",")
    names = frozenset(g.strip() for g in value or () if g.strip())
    unknown = names - set(GROUPS)
    if unknown:
        raise PydanticCustomError(
            "bench_groups",
            "names unknown groups {unknown}; choose from {groups}",
            {"unknown": sorted(unknown), "groups": ", ".join(GROUPS)},
        )
    return names


def _none_if_empty(value: Any) -> Any:
    return None if value == "" else value


# NoDecode: a comma list, not JSON (pydantic-settings decodes set-typed env values as JSON).
Groups = Annotated[frozenset[str], NoDecode, BeforeValidator(_groups)]


class BenchConfig(BaseSettings):
    """The BENCH_* variables (see the module docstring); `from_env` turns a bad value into a
    `ConfigError` naming the variable."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    scale: Annotated[int, BeforeValidator(_bench_int(100))] = Field(
        1_000_000, validation_alias="BENCH_SCALE"
    )
    repeat: Annotated[int, BeforeValidator(_bench_int(1))] = Field(
        3, validation_alias="BENCH_REPEAT"
    )
    dashboard_runs: Annotated[int, BeforeValidator(_bench_int(1))] = Field(
        50, validation_alias="BENCH_DASHBOARD_RUNS"
    )
    output: Path = Field(
        REPO_ROOT / "bench" / "results" / "latest.json", validation_alias="BENCH_OUTPUT"
    )
    data_dir: Annotated[Path | None, BeforeValidator(_none_if_empty)] = Field(
        None, validation_alias="BENCH_DATA_DIR"
    )
    # Three consecutive ports from here: the last one must still be a port (65535).
    port_base: Annotated[
        int | None,
        BeforeValidator(lambda v: None if v in ("", None) else _bench_int(1024, 65533)(v)),
    ] = Field(None, validation_alias="BENCH_PORT_BASE")
    only: Groups = Field(frozenset(), validation_alias="BENCH_ONLY")
    skip: Groups = Field(frozenset(), validation_alias="BENCH_SKIP")
    worker_timeout: Annotated[float, BeforeValidator(_bench_int(10))] = Field(
        7200, validation_alias="BENCH_WORKER_TIMEOUT"
    )
    freshness_seconds: Annotated[int, BeforeValidator(_bench_int(1, 3600))] = Field(
        10, validation_alias="BENCH_FRESHNESS_SECONDS"
    )
    freshness_probes: Annotated[int, BeforeValidator(_bench_int(1, 100))] = Field(
        10, validation_alias="BENCH_FRESHNESS_PROBES"
    )

    @property
    def groups(self) -> frozenset[str]:
        """The groups to run: BENCH_ONLY (all when unset) less BENCH_SKIP."""
        return (self.only or frozenset(GROUPS)) - self.skip

    @property
    def small_scale(self) -> int:
        """The dataset of the memory comparison ("100k" when the scale is 1M)."""
        return max(1, self.scale // 10)

    def wants(self, group: str) -> bool:
        return group in self.groups

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BenchConfig:
        """The config from `env` (default: the process environment); an empty value is unset."""
        env = os.environ if env is None else env
        given = {k: v for k, v in env.items() if k.startswith("BENCH_") and v.strip()}
        try:
            # model_validate reads only `given`, never the process environment.
            return cls.model_validate(given)
        except ValidationError as exc:
            first = exc.errors()[0]
            name = ".".join(str(part) for part in first["loc"])
            # "BENCH_SCALE='1e6' is not an integer", "BENCH_ONLY names unknown groups [...]"
            joint = " " if first["type"] == "bench_groups" else "="
            raise ConfigError(f"{name}{joint}{first['msg']}") from None
