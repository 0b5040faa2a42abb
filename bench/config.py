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
from dataclasses import dataclass, field
from pathlib import Path

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
)


class ConfigError(ValueError):
    """A BENCH_* variable has a value the bench cannot use."""


def _int(
    env: dict[str, str], name: str, default: int, minimum: int, maximum: int | None = None
) -> int:
    raw = env.get(name, "").replace("_", "").strip()
    if not raw:
        return default
    # ASCII digits only (int() would also take other scripts' digits, such as "٣").
    digits = raw[1:] if raw[:1] in "+-" else raw
    if not (digits.isascii() and digits.isdigit()):
        raise ConfigError(f"{name}={env[name]!r} is not an integer")
    value = int(raw)
    if value < minimum:
        raise ConfigError(f"{name}={value} is too small: use at least {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}={value} is too large: use at most {maximum}")
    return value


def _groups(env: dict[str, str], name: str) -> frozenset[str]:
    raw = env.get(name, "")
    names = frozenset(g.strip() for g in raw.split(",") if g.strip())
    unknown = names - set(GROUPS)
    if unknown:
        raise ConfigError(
            f"{name} names unknown groups {sorted(unknown)}; choose from {', '.join(GROUPS)}"
        )
    return names


@dataclass(frozen=True)
class BenchConfig:
    scale: int = 1_000_000
    repeat: int = 3
    dashboard_runs: int = 50
    output: Path = REPO_ROOT / "bench" / "results" / "latest.json"
    data_dir: Path | None = None
    port_base: int | None = None
    groups: frozenset[str] = field(default_factory=lambda: frozenset(GROUPS))
    worker_timeout: float = 7200.0
    freshness_seconds: int = 10
    freshness_probes: int = 10

    @property
    def small_scale(self) -> int:
        """The dataset of the memory comparison ("100k" when the scale is 1M)."""
        return max(1, self.scale // 10)

    def wants(self, group: str) -> bool:
        return group in self.groups

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> BenchConfig:
        env = dict(os.environ if env is None else env)
        only = _groups(env, "BENCH_ONLY") or frozenset(GROUPS)
        skip = _groups(env, "BENCH_SKIP")
        port_base = env.get("BENCH_PORT_BASE")
        data_dir = env.get("BENCH_DATA_DIR")
        return cls(
            scale=_int(env, "BENCH_SCALE", 1_000_000, 100),
            repeat=_int(env, "BENCH_REPEAT", 3, 1),
            dashboard_runs=_int(env, "BENCH_DASHBOARD_RUNS", 50, 1),
            output=Path(env.get("BENCH_OUTPUT") or cls.output),
            data_dir=Path(data_dir) if data_dir else None,
            # Three consecutive ports from here: the last one must still be a port (65535).
            port_base=_int(env, "BENCH_PORT_BASE", 0, 1024, 65533) if port_base else None,
            groups=only - skip,
            worker_timeout=float(_int(env, "BENCH_WORKER_TIMEOUT", 7200, 10)),
            freshness_seconds=_int(env, "BENCH_FRESHNESS_SECONDS", 10, 1, 3600),
            freshness_probes=_int(env, "BENCH_FRESHNESS_PROBES", 10, 1, 100),
        )
