"""deploy/: the compose file and the ClickHouse / Keeper configs parse and agree with each other
and with the loader's cluster mode. Docker is not available here: nothing of it is started."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CLUSTER = "pipeline"


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def xml(path: Path) -> ET.Element:
    return ET.parse(path).getroot()


def test_every_config_file_is_well_formed_xml() -> None:
    files = sorted(DEPLOY.rglob("*.xml"))
    assert len(files) == 8
    for path in files:
        assert xml(path).tag == "clickhouse", path


def test_compose_runs_two_shards_of_two_replicas_three_keepers_three_mongod_redis_prefect() -> None:
    services = compose()["services"]
    assert {s for s in services if s.startswith("ch-")} == {
        "ch-s1-r1",
        "ch-s1-r2",
        "ch-s2-r1",
        "ch-s2-r2",
    }
    assert {s for s in services if s.startswith("keeper-")} == {"keeper-1", "keeper-2", "keeper-3"}
    assert {s for s in services if s.startswith("mongo-")} == {
        "mongo-1",
        "mongo-2",
        "mongo-3",
        "mongo-init",
    }
    assert {"redis", "prefect-server", "worker"} <= set(services)
    assert services["worker"]["environment"]["CLICKHOUSE_CLUSTER"] == CLUSTER
    assert (DEPLOY / services["worker"]["build"]["dockerfile"].removeprefix("deploy/")).is_file()


def test_every_mounted_config_exists_and_each_server_gets_its_own_macros() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).is_file(), (name, source)
    for name in (s for s in services if s.startswith("ch-")):
        macros = xml(DEPLOY / "clickhouse" / f"macros-{name.removeprefix('ch-')}.xml")
        assert macros.findtext("macros/replica") == name
        assert macros.findtext("macros/cluster") == CLUSTER
        shard = name.split("-")[1].removeprefix("s")
        assert macros.findtext("macros/shard") == shard


def test_remote_servers_names_the_cluster_the_worker_uses_with_every_server_once() -> None:
    config = xml(DEPLOY / "clickhouse" / "cluster.xml")
    cluster = config.find(f"remote_servers/{CLUSTER}")
    assert cluster is not None
    shards = [
        [r.findtext("host") for r in shard.findall("replica")] for shard in cluster.findall("shard")
    ]
    assert shards == [["ch-s1-r1", "ch-s1-r2"], ["ch-s2-r1", "ch-s2-r2"]]
    assert all(s.findtext("internal_replication") == "true" for s in cluster.findall("shard"))
    keepers = [n.findtext("host") for n in config.findall("zookeeper/node")]
    assert keepers == ["keeper-1", "keeper-2", "keeper-3"]


def test_each_keeper_has_its_own_id_and_the_same_raft_members() -> None:
    ids, members = [], []
    for k in (1, 2, 3):
        server = xml(DEPLOY / "keeper" / f"keeper-{k}.xml").find("keeper_server")
        assert server is not None
        ids.append(server.findtext("server_id"))
        members.append(
            [s.findtext("hostname") for s in server.findall("raft_configuration/server")]
        )
    assert ids == ["1", "2", "3"]
    assert members == [["keeper-1", "keeper-2", "keeper-3"]] * 3
