"""Failover: a 3-member replica set loses its primary while the loader works, and ClickHouse
still ends up exactly equal to MongoDB.

One set (three `mongod`s of the wheel, `devstack.replica_set`) serves the whole module, with
ClickHouse and Redis beside it. Every scenario checks that its fault landed: the old primary's
process is dead, another member was elected, and the loader or follower was mid-run (it stored
batches before the kill and after it). The members call an election after 2 s without a primary
(MongoDB's default is 10 s), so a scenario fits well under a minute; docs/scaling/mongodb.md has
the figures at both settings.

- a sync whose primary is SIGKILLed between two batches finishes on the new primary;
- the change-stream follower resumes on the new primary and loads what is written after it;
- a write acknowledged with w:1 and rolled back when its primary came back (a real rollback:
  the secondaries' replication is stopped with a fail point, so the write exists only on the
  primary) is tombstoned by the next reconcile;
- LOADER_READ_PREFERENCE=secondaryPreferred sends the snapshot's reads to a secondary.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from harness import (
    Comparison,
    Report,
    assert_all_ok,
    compare_raw,
    reconcile_found_only_deletes,
    sync_alone,
)
from pymongo import MongoClient, WriteConcern
from pymongo.errors import PyMongoError
from world import World, emptied_world

from devstack.process import free_ports, is_alive
from devstack.replica_set import MongoReplicaSet, ReplicaMember
from devstack.stack import Stack
from loader.clients import open_clients_now
from loader.follower import StoredBatch, follow_changes
from loader.sync import BatchStored, ensure_watermark_index, sync_collection
from synthetic import mutate

ELECTION_TIMEOUT_MS = 2_000
# While the secondaries' replication is stopped they must not call an election themselves.
FROZEN_ELECTION_TIMEOUT_MS = 60_000
SERVERS_BESIDE_MONGO = ("clickhouse", "redis")
SYNC_TASKS, SYNC_BATCH, KILL_BEFORE_BATCH = 6_000, 400, 4
FOLLOW_TASKS = 2_000
# Upper bound on waiting for ClickHouse to catch up: a broken path fails instead of hanging.
CATCH_UP_S = 90.0


class ReplicaSetStack(Stack):
    """The stack with its MongoDB replaced by a replica set (ClickHouse and Redis as usual)."""

    def __init__(
        self, data_dir: Path, replica_set: MongoReplicaSet, clickhouse_port: int, redis_port: int
    ) -> None:
        super().__init__(data_dir, replica_set.member(0).port, clickhouse_port, redis_port)
        self.replica_set = replica_set

    @property
    def mongo_uri(self) -> str:
        return self.replica_set.url


@pytest.fixture(scope="module")
def replica_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicaSetStack]:
    data_dir = tmp_path_factory.mktemp("replica_set")
    *mongo_ports, clickhouse_port, redis_port = free_ports(5)
    replica_set = MongoReplicaSet(
        data_dir, mongo_ports, election_timeout_ms=ELECTION_TIMEOUT_MS, test_commands=True
    )
    stack = ReplicaSetStack(data_dir, replica_set, clickhouse_port, redis_port)
    replica_set.up()
    try:
        stack.up(SERVERS_BESIDE_MONGO)
        yield stack
    finally:
        with contextlib.suppress(Exception):
            stack.down(SERVERS_BESIDE_MONGO)
        heal(replica_set)
        replica_set.down()


def heal(replica_set: MongoReplicaSet) -> None:
    """Every member running, replicating, and the set settled: what a scenario starts from."""
    for member in replica_set.members:
        if not member.status().running:
            member.start()
        with contextlib.suppress(PyMongoError), member.direct_client() as client:
            client.admin.command("configureFailPoint", "stopReplProducer", mode="off")
    primary = replica_set.wait_until_settled()
    with primary.direct_client() as client:
        set_election_timeout(client, ELECTION_TIMEOUT_MS)


@pytest.fixture
def rs_world(replica_stack: ReplicaSetStack, tmp_path: Path) -> Iterator[World]:
    heal(replica_stack.replica_set)
    with emptied_world(replica_stack, tmp_path) as world:
        yield world


@dataclass(frozen=True)
class Failover:
    old: ReplicaMember
    new: ReplicaMember
    seconds_to_new_primary: float


def kill_primary(replica_set: MongoReplicaSet) -> ReplicaMember:
    """SIGKILL the primary; fails unless its process is really gone."""
    old = replica_set.primary()
    assert old is not None, f"no primary to kill: {replica_set.states()}"
    outcome = old.kill()
    assert outcome.action == "killed" and outcome.pid is not None, outcome
    assert not is_alive(outcome.pid), f"the primary (pid {outcome.pid}) survived SIGKILL"
    return old


def elected_after(replica_set: MongoReplicaSet, old: ReplicaMember, killed_at: float) -> Failover:
    """Wait for another member to be elected; fails unless it is another host."""
    new = replica_set.wait_for_primary(timeout=60, other_than=old)
    assert new.address != old.address
    return Failover(old, new, time.monotonic() - killed_at)


def wait_until(condition: Callable[[], bool], what: str, errors: list[BaseException]) -> None:
    deadline = time.monotonic() + CATCH_UP_S
    while not condition():
        assert not errors, f"the follower failed while waiting for {what}: {errors!r}"
        assert time.monotonic() < deadline, f"{what}: not within {CATCH_UP_S:.0f}s"
        time.sleep(0.2)


def all_in_clickhouse(world: World) -> bool:
    return compare_raw(world.ch, world.truth("tasks"), "tasks").ok


# -- a) the primary dies during a sync ------------------------------------------------------------
def test_a_sync_whose_primary_is_killed_mid_run_finishes_on_the_new_primary_exactly(
    rs_world: World, replica_stack: ReplicaSetStack, report: Report
) -> None:
    world, replica_set = rs_world, replica_stack.replica_set
    world.seed(SYNC_TASKS)
    killed: list[tuple[ReplicaMember, float]] = []
    stored_after_kill: list[tuple[int, float]] = []

    def kill_before(batch_no: int) -> None:
        if batch_no == KILL_BEFORE_BATCH:
            killed.append((kill_primary(replica_set), time.monotonic()))

    def stored(batch: BatchStored) -> None:
        if killed:
            stored_after_kill.append((batch.batch_no, time.monotonic()))

    started = time.monotonic()
    result = sync_collection(
        world.settings,
        "tasks",
        batch_size=SYNC_BATCH,
        before_insert=kill_before,
        after_insert=stored,
    )

    assert killed, f"the sync never reached batch {KILL_BEFORE_BATCH}"
    old, killed_at = killed[0]
    elected_after(replica_set, old, killed_at)
    assert result.status == "ok", result
    comparisons: list[Comparison] = [sync_alone(compare_raw(world.ch, world.truth(), "tasks"))]
    comparisons.append(reconcile_found_only_deletes(world.reconcile("tasks")))
    comparisons += world.compare_raw()
    report.record("failover: primary killed mid-sync", comparisons, time.monotonic() - started, 1)
    assert_all_ok(comparisons)
    # Batch KILL_BEFORE_BATCH was read before the kill; the ones after it come from the new
    # primary (the old one's cursor died with it).
    later = [n for n, _ in stored_after_kill if n > KILL_BEFORE_BATCH]
    assert later, "the sync stored no batch after the kill: it did not go on on the new primary"
    pause = stored_after_kill[1][1] - killed_at if len(stored_after_kill) > 1 else float("nan")
    print(f"sync failover: first batch from the new primary stored {pause:.1f}s after the kill")


# -- b) the primary dies while the change-stream follower runs ------------------------------------
def test_the_follower_resumes_on_the_new_primary_and_loads_the_writes_made_after_the_election(
    rs_world: World, replica_stack: ReplicaSetStack, report: Report
) -> None:
    world, replica_set = rs_world, replica_stack.replica_set
    world.seed(FOLLOW_TASKS)
    world.sync("tasks")
    follow_changes(world.settings, "tasks", all_changes=True, max_events=0)  # position saved
    stop = threading.Event()
    stored: list[StoredBatch] = []
    errors: list[BaseException] = []

    # Server selection gives up before the election is over (1 s against 2 s), so pymongo's own
    # resume of the stream fails and the follower's retries must carry it to the new primary.
    impatient = world.settings.model_copy(update={"connect_timeout_seconds": 1.0})

    def run() -> None:
        try:
            follow_changes(impatient, "tasks", all_changes=True, stop=stop, on_stored=stored.append)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        mutate(world.db, 150, seed=21)
        # `on_stored` runs once a batch is settled, a little after its rows are in raw.
        wait_until(
            lambda: bool(stored) and all_in_clickhouse(world), "the writes before the kill", errors
        )
        before_kill = len(stored)

        old = kill_primary(replica_set)
        failover = elected_after(replica_set, old, time.monotonic())
        written_at = time.monotonic()
        mutate(world.db, 150, seed=22)
        victims = [d["_id"] for d in world.db.tasks.aggregate([{"$sample": {"size": 25}}])]
        world.db.tasks.delete_many({"_id": {"$in": victims}})
        wait_until(
            lambda: len(stored) > before_kill and all_in_clickhouse(world),
            "the writes after the election",
            errors,
        )
        print(
            f"follower failover: new primary {failover.new.address} after "
            f"{failover.seconds_to_new_primary:.1f}s; writes made after the election in "
            f"ClickHouse {time.monotonic() - written_at:.1f}s after they started"
        )
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors
    assert not thread.is_alive(), "the follower did not stop"
    comparisons = world.compare_raw()  # deletes included: the follower tombstones them
    scenario = "failover: primary killed under the follower"
    report.record(scenario, comparisons, time.monotonic() - started, 1)
    assert_all_ok(comparisons)


# -- c) a w:1 write is rolled back ----------------------------------------------------------------
def set_election_timeout(client: MongoClient, ms: int) -> None:
    """Reconfigure the set's election timeout; retried while an election interrupts it (a
    reconfig needs a primary and a majority that has the previous config)."""
    deadline = time.monotonic() + CATCH_UP_S
    while True:
        try:
            config = client.admin.command("replSetGetConfig")["config"]
            if config["settings"]["electionTimeoutMillis"] == ms:
                return
            config["settings"]["electionTimeoutMillis"] = ms
            config["version"] += 1
            client.admin.command("replSetReconfig", config)
            return
        except PyMongoError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def replication(members: list[ReplicaMember], *, stopped: bool) -> None:
    """Stop (or restart) fetching the oplog on `members`: what the primary writes then exists
    only on the primary."""
    for member in members:
        with member.direct_client() as client:
            client.admin.command(
                "configureFailPoint", "stopReplProducer", mode="alwaysOn" if stopped else "off"
            )


def is_secondary(member: ReplicaMember) -> bool:
    try:
        with member.direct_client() as client:
            return bool(client.admin.command("hello").get("secondary"))
    except PyMongoError:
        return False


def wait_for_rollback(member: ReplicaMember) -> list[Path]:
    """Wait until `member` has rolled back and is a secondary again; return the files the
    rollback left (the documents it removed, per collection). Its rollback id is no proof: a
    restart after a kill moves it too."""
    deadline = time.monotonic() + CATCH_UP_S
    while True:
        files = sorted((member.db_path / "rollback").rglob("*.bson"))
        if files and is_secondary(member):
            return files
        assert time.monotonic() < deadline, (
            f"{member.address} rejoined without a rollback within {CATCH_UP_S:.0f}s "
            f"(see {member.log_path})"
        )
        time.sleep(0.2)


def test_a_w1_write_rolled_back_by_a_failover_is_not_left_in_clickhouse_after_reconcile(
    rs_world: World, replica_stack: ReplicaSetStack, report: Report
) -> None:
    world, replica_set = rs_world, replica_stack.replica_set
    started = time.monotonic()
    world.seed(1_000)
    # One pair of connections for both syncs: the index is ensured by the first one, so the
    # second issues no command that would wait for a majority that cannot answer.
    clients = open_clients_now(world.settings)
    try:
        sync_collection(world.settings, "tasks", clients=clients)
        old = replica_set.primary()
        assert old is not None
        secondaries = [m for m in replica_set.members if m is not old]
        set_election_timeout(world.mongo, FROZEN_ELECTION_TIMEOUT_MS)
        replication(secondaries, stopped=True)
        try:
            doomed = dict(world.db.tasks.find_one({}, {"_id": 0}) or {})
            doomed |= {"_id": ObjectId(), "file_id": "ROLLED-BACK", "updated_at": now()}
            # j=True: on the primary's journal before the kill, else the kill can lose it (an
            # unclean shutdown within the journal's commit interval) and there is no rollback.
            on_primary_only = WriteConcern(w=1, j=True)
            world.db.tasks.with_options(write_concern=on_primary_only).insert_one(doomed)
            sync_collection(world.settings, "tasks", clients=clients)
            assert live_in_clickhouse(world, doomed["_id"]), "the sync did not load the w:1 write"
            assert old.is_primary(), "the primary changed before the kill: no rollback to see"
            kill_primary(replica_set)
        finally:
            replication(secondaries, stopped=False)
    finally:
        clients.close()
    killed_at = time.monotonic()
    with secondaries[0].direct_client() as client:
        client.admin.command("replSetStepUp")  # no need to wait out the frozen timeout
    failover = elected_after(replica_set, old, killed_at)
    set_election_timeout(world.mongo, ELECTION_TIMEOUT_MS)
    old.start()
    rolled_back = wait_for_rollback(old)
    replica_set.wait_until_settled(timeout=60)

    assert world.db.tasks.find_one({"_id": doomed["_id"]}) is None
    assert live_in_clickhouse(world, doomed["_id"]), "loaded, and still live before reconcile"
    result = world.reconcile("tasks")
    print(
        f"rollback: new primary {failover.new.address} (stepped up); {old.address} rolled back "
        f"into {[p.name for p in rolled_back]}; reconcile tombstoned {result.deletes}"
    )
    comparisons = world.compare_raw()
    report.record("failover: w:1 write rolled back", comparisons, time.monotonic() - started, 1)
    assert_all_ok(comparisons)
    assert not live_in_clickhouse(world, doomed["_id"])


def now() -> datetime:
    # BSON dates hold milliseconds: keep the value the comparison will read back.
    t = datetime.now(UTC)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def live_in_clickhouse(world: World, _id: Any) -> bool:
    rows = world.ch.query(
        "SELECT count() FROM raw.tasks FINAL WHERE _id = {id:String} AND is_deleted = 0",
        parameters={"id": str(_id)},
    ).result_rows
    return bool(rows[0][0])


# -- readPreference for the snapshot ---------------------------------------------------------------
def reads_per_member(replica_set: MongoReplicaSet, namespace: str) -> dict[str, int]:
    """Queries (`find`) and `getMore`s each member has served on `namespace` (`top` counts per
    collection, so a secondary tailing another one's oplog does not count)."""
    counts = {}
    for member in replica_set.members:
        with member.direct_client() as client:
            totals = client.admin.command("top")["totals"].get(namespace, {})
        counts[member.address] = sum(
            int(totals.get(kind, {}).get("count", 0)) for kind in ("queries", "getmore")
        )
    return counts


def election_term(member: ReplicaMember) -> int:
    with member.direct_client() as client:
        return int(client.admin.command("replSetGetStatus")["term"])


@pytest.mark.parametrize("preference", ["primary", "secondaryPreferred"])
def test_the_snapshot_reads_from_the_members_its_read_preference_names(
    rs_world: World, replica_stack: ReplicaSetStack, preference: str
) -> None:
    world, replica_set = rs_world, replica_stack.replica_set
    world.seed(1_000)
    settings = world.settings.model_copy(update={"read_preference": preference})
    # The watermark index first: each secondary's build of it scans `tasks`, which `top`
    # counts as reads of that member.
    ensure_watermark_index(world.db.tasks, settings)
    # w: all members, so whichever secondary serves the read holds every seeded document (and
    # the index).
    world.db.get_collection("sentinel", write_concern=WriteConcern(w=3)).insert_one({})
    # No election while the sync reads: on a loaded machine a 2 s timeout can elect another
    # primary, which pymongo's retried read then uses (the next test's `heal` restores it).
    set_election_timeout(world.mongo, FROZEN_ELECTION_TIMEOUT_MS)
    primary = replica_set.primary()
    assert primary is not None
    namespace = f"{world.db.name}.tasks"
    term = election_term(primary)
    before = reads_per_member(replica_set, namespace)

    sync_collection(settings, "tasks")

    after = reads_per_member(replica_set, namespace)
    assert election_term(primary) == term, "an election during the sync: the reads moved with it"
    grew = {a for a, n in after.items() if n > before[a]}
    if preference == "primary":
        assert grew == {primary.address}, grew
    else:
        assert grew and primary.address not in grew, (grew, primary.address)
    assert_all_ok(world.compare_raw())
