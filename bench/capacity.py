"""Benchmark 4: what one job, one worker and one watched job cost PostgreSQL and Redis.

A real API and a real worker (`app.cli.WORKER_COMMAND`) on a throwaway database and a queue of
their own. Counters are the servers' own, read over windows of a few seconds:

- `pg_stat_database` for this database (transactions, tuples): per database, but a backend
  reports its counters at most once a second, so a window's edges are blurred by about a second.
- This database's WAL, exactly: `pg_walinspect` reads the records of each window's LSN range and
  keeps those whose blocks lie in this database (and their transactions' commit records). Each
  writing transaction is classed by the tables it touched: metric point (jobs + metric_points),
  checkpoint (checkpoints), heartbeat (jobs only). `pg_stat_wal` is cluster-wide (other people's
  tests write there too) and printed only as such.
- Redis `MONITOR`, kept to the worker's own connections (matched by local port through /proc);
  `INFO` totals are cluster-wide and printed only as such.

Phases: (1) the API alone with a queued job watched by 0, 1 and 10 SSE clients (no worker yet,
so every read in the database is the API's event poller); (2) the worker trains that job (the
default `log_every` 10, a checkpoint every 50 steps, samples off); (3) the worker idle (its
sweeper and Celery's polling). Then a pgbench run of the metric-point transaction's shape says
how many such commits this machine's PostgreSQL takes per second, and the retention section
(bench/retention.py) what thinning a long job's metric points saves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

from app.auth.keys import generate_key
from app.cli import WORKER_COMMAND
from app.config import Settings
from app.db import upgrade_database
from app.spec import TrainingSpec
from bench import retention
from bench.api import BIN, free_port, wait_ready, wait_status
from bench.common import PG_ADMIN_URL, REDIS_URL, machine, process, service_env, throwaway_database

LOG_EVERY = TrainingSpec.model_fields["log_every"].default  # the default under measure (10)
CHECKPOINT_EVERY_DEFAULT = TrainingSpec.model_fields["checkpoint_every"].default
HEARTBEAT_S = Settings.model_fields["heartbeat_interval_s"].default
CHECKPOINT_EVERY = 50  # often enough that a short window holds a few
STEP_RATES = (2, 10, 30)  # steps/s of the projection table


def measured_job(short: bool) -> dict[str, Any]:
    """Trains until cancelled, at the default log_every."""
    training = {"steps": 1_000_000, "batch_size": 8, "checkpoint_every": CHECKPOINT_EVERY, "sample_every": 0}
    return {"name": "bench capacity", "dataset": {"image_size": 8}, "training": training}


# --- PostgreSQL -----------------------------------------------------------------------------
DB_COUNTERS = ("xact_commit", "xact_rollback", "tup_returned", "tup_fetched", "tup_inserted", "tup_updated",
               "tup_deleted", "blks_read", "blks_hit")  # fmt: skip


def _admin_url() -> str:
    return PG_ADMIN_URL


def _plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@dataclass
class Snapshot:
    at: float
    db: dict[str, int]
    wal_lsn: str
    wal_cluster: dict[str, int]
    redis_cluster: dict[str, int]


def snapshot(admin: psycopg.Connection, dbname: str, r: redis.Redis) -> Snapshot:
    admin.execute("SELECT pg_stat_clear_snapshot()")
    cols = ", ".join(DB_COUNTERS)
    row = admin.execute(f"SELECT {cols} FROM pg_stat_database WHERE datname = %s", (dbname,)).fetchone()
    wal = admin.execute("SELECT wal_records, wal_bytes::bigint, pg_current_wal_flush_lsn()::text FROM pg_stat_wal")
    records, wal_bytes, lsn = wal.fetchone()  # type: ignore[misc]
    info = r.info("stats")
    return Snapshot(
        at=time.time(),
        db=dict(zip(DB_COUNTERS, row, strict=True)),  # type: ignore[arg-type]
        wal_lsn=lsn,
        wal_cluster={"wal_records": records, "wal_bytes": int(wal_bytes)},
        redis_cluster={k: int(info[k]) for k in ("total_commands_processed", "total_net_input_bytes")},
    )


WAL_BY_TRANSACTION = """
WITH r AS (SELECT * FROM pg_get_wal_records_info(%(start)s::pg_lsn, %(end)s::pg_lsn)),
mine AS (SELECT *, (regexp_match(block_ref, 'rel \\d+/' || %(db)s || '/(\\d+)'))[1]::oid AS node
         FROM r WHERE block_ref ~ ('rel \\d+/' || %(db)s || '/'))
SELECT r.xid::text, r.resource_manager, r.record_type, (r.end_lsn - r.start_lsn)::bigint, r.fpi_length,
       mine.node
FROM r LEFT JOIN mine ON mine.start_lsn = r.start_lsn
WHERE mine.node IS NOT NULL OR (r.xid <> '0' AND r.xid IN (SELECT xid FROM mine WHERE xid <> '0'))
"""


@dataclass
class WalClass:
    transactions: int = 0
    records: int = 0
    bytes: int = 0
    fpi_bytes: int = 0


def wal_by_class(url: str, start: str, end: str) -> dict[str, WalClass]:
    """This database's WAL between two LSNs, per kind of writing transaction (exact: read from the
    WAL itself). Records without a transaction (page pruning, hint bits) are class `no xid`."""
    if _lsn(end) <= _lsn(start):  # no WAL at all in the window (pg_walinspect refuses the range)
        return {"no xid": WalClass()}
    with psycopg.connect(_plain(url), autocommit=True) as conn:
        dboid = conn.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()[0]  # type: ignore[index]
        names = dict(
            conn.execute(
                """SELECT pg_relation_filenode(c.oid), coalesce(t.relname, c.relname)
                   FROM pg_class c LEFT JOIN pg_index i ON i.indexrelid = c.oid
                   LEFT JOIN pg_class t ON t.oid = i.indrelid
                   WHERE pg_relation_filenode(c.oid) IS NOT NULL"""
            ).fetchall()
        )
        rows = conn.execute(WAL_BY_TRANSACTION, {"start": start, "end": end, "db": str(dboid)}).fetchall()
    per_xid: dict[str, dict[str, Any]] = {}
    loose = WalClass()
    for xid, _rm, _type, size, fpi, node in rows:
        if xid == "0":
            loose.records += 1
            loose.bytes += size
            loose.fpi_bytes += fpi or 0
            continue
        tx = per_xid.setdefault(xid, {"tables": set(), "records": 0, "bytes": 0, "fpi": 0})
        if node is not None:
            tx["tables"].add(names.get(node, "pg_catalog/other"))
        tx["records"] += 1
        tx["bytes"] += size
        tx["fpi"] += fpi or 0
    classes: dict[str, WalClass] = {"no xid": loose}
    for tx in per_xid.values():
        kind = _transaction_kind(tx["tables"])
        c = classes.setdefault(kind, WalClass())
        c.transactions += 1
        c.records += tx["records"]
        c.bytes += tx["bytes"]
        c.fpi_bytes += tx["fpi"]
    return classes


def _lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def _transaction_kind(tables: set[str]) -> str:
    if "checkpoints" in tables:
        return "checkpoint"
    if "metric_points" in tables:
        return "metric point"
    if tables == {"jobs"}:
        return "heartbeat"
    return "other: " + ",".join(sorted(tables))


# --- Redis ----------------------------------------------------------------------------------
def _socket_ports(pid: int) -> set[int]:
    """Local TCP ports of a process's sockets (from /proc: its fds' inodes in /proc/net/tcp*)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return set()
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[9] in inodes:
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


class RedisMonitor:
    """Every command Redis receives (MONITOR on a socket of its own), kept when it comes from one
    of `pids` (matched by the client's local port)."""

    LINE = re.compile(r'^\+(\d+\.\d+) \[\d+ [^\]]*:(\d+)\] "([^"]*)"')

    def __init__(self, url: str) -> None:
        self.pids: dict[str, int] = {}
        self.commands: list[tuple[float, str, str]] = []  # (time, owner, command name)
        self._owners: dict[int, str] = {}
        parts = redis.connection.parse_url(url)
        self._sock = socket.create_connection((parts.get("host", "127.0.0.1"), parts.get("port", 6379)))
        self._thread = threading.Thread(target=self._listen, daemon=True)

    def start(self) -> None:
        self._sock.sendall(b"MONITOR\r\n")
        self._thread.start()

    def _owner(self, port: int) -> str:
        if port not in self._owners:
            owner = next((name for name, pid in self.pids.items() if port in _socket_ports(pid)), "")
            if not owner:
                return "other"  # not cached: the port may belong to a process started later
            self._owners[port] = owner
        return self._owners[port]

    def _listen(self) -> None:
        with self._sock.makefile("rb") as lines:
            for raw in lines:
                match = self.LINE.match(raw.decode(errors="replace"))
                if match and self.pids:
                    owner = self._owner(int(match.group(2)))
                    if owner != "other":
                        self.commands.append((float(match.group(1)), owner, match.group(3).upper()))

    def stop(self) -> None:
        self._sock.close()

    def between(self, start: float, end: float, owner: str) -> Counter[str]:
        return Counter(name for t, who, name in self.commands if who == owner and start <= t < end)


# --- one window -----------------------------------------------------------------------------
@dataclass
class Window:
    phase: str
    seconds: float
    db: dict[str, int]
    wal: dict[str, WalClass]
    wal_cluster: dict[str, int]
    redis_cluster: dict[str, int]
    redis_worker: Counter[str] = field(default_factory=Counter)
    redis_api: Counter[str] = field(default_factory=Counter)

    def writes(self) -> int:
        return sum(c.transactions for c in self.wal.values())


class Meter:
    def __init__(self, url: str, monitor: RedisMonitor) -> None:
        self.url = url
        self.dbname = url.rsplit("/", 1)[1]
        self.admin = psycopg.connect(_admin_url(), autocommit=True)
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.monitor = monitor
        self.windows: list[Window] = []

    def close(self) -> None:
        self.admin.close()
        self.redis.close()

    def measure(self, phase: str, seconds: float) -> Window:
        a = snapshot(self.admin, self.dbname, self.redis)
        time.sleep(seconds)
        b = snapshot(self.admin, self.dbname, self.redis)
        w = Window(
            phase=phase,
            seconds=b.at - a.at,
            db={k: b.db[k] - a.db[k] for k in DB_COUNTERS},
            wal=wal_by_class(self.url, a.wal_lsn, b.wal_lsn),
            wal_cluster={k: b.wal_cluster[k] - a.wal_cluster[k] for k in a.wal_cluster},
            redis_cluster={k: b.redis_cluster[k] - a.redis_cluster[k] for k in a.redis_cluster},
            redis_worker=self.monitor.between(a.at, b.at, "worker"),
            redis_api=self.monitor.between(a.at, b.at, "api"),
        )
        self.windows.append(w)
        time.sleep(1.2)  # the wal_by_class connection's own counters land before the next window
        return w

    def phase(self, name: str) -> list[Window]:
        return [w for w in self.windows if w.phase == name]


@contextmanager
def watchers(url: str, key: str, count: int, seconds: float, settle_s: float) -> Iterator[None]:
    """`count` SSE streams of `url` in a second process for `seconds`; yields once they are up
    and the counters of their connects (key check, replay) have been reported."""
    argv = [sys.executable, "-m", "bench.watchers", url, "--count", str(count), "--seconds", str(seconds)]
    argv += ["--header", f"Authorization: Bearer {key}"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
        time.sleep(settle_s)
        yield
        out, _ = proc.communicate(timeout=60)
    seen = json.loads(out.splitlines()[-1])
    if seen["connected"] != count:
        raise RuntimeError(f"only {seen['connected']} of {count} SSE watchers connected")


# --- pgbench: how many metric-point commits this PostgreSQL takes ---------------------------
PGBENCH_SCRIPT = """\
BEGIN;
UPDATE jobs SET step = step + 10, loss = 0.1, heartbeat_at = now(), updated_at = now()
  WHERE id = md5(:client_id::text)::uuid AND attempt = 1 AND status = 'running';
INSERT INTO metric_points (job_id, step, loss, lr, images_per_s, loss_by_t, created_at)
  SELECT id, step, 0.1, 0.0002, 100.0,
    '[0.9876, 0.5432, 0.2109, 0.1234, 0.08765, 0.06543, 0.04321, 0.02109, 0.01234, 0.009876]', now()
  FROM jobs WHERE id = md5(:client_id::text)::uuid;
SELECT cancel_requested FROM jobs WHERE id = md5(:client_id::text)::uuid;
END;
"""


def pgbench_commit_rate(clients: list[int], seconds: int) -> tuple[dict[int, float] | str, float]:
    """Transactions/s of the metric-point transaction's shape (one job row per client), by pgbench
    on a database of its own (a string says why not measured), and the bytes on disk per
    metric_points row (heap + index) once pgbench has written its many rows."""
    pgbench = shutil.which("pgbench")
    if pgbench is None:
        return "pgbench not installed", 0.0
    rates: dict[int, float] = {}
    with throwaway_database() as url, tempfile.TemporaryDirectory(prefix="bench-pgbench-") as tmp:
        upgrade_database(Settings(database_url=url, data_dir=Path(tmp)))
        with psycopg.connect(_plain(url), autocommit=True) as conn:
            owner = uuid.uuid4()
            conn.execute(
                "INSERT INTO users (id, name, is_admin, created_at) VALUES (%s, 'pgbench', false, now())", (owner,)
            )
            conn.execute(
                """INSERT INTO jobs (id, owner_id, status, spec, total_steps, step, attempt, cancel_requested,
                                     created_at, updated_at)
                   SELECT md5(c::text)::uuid, %s, 'running', '{}', 1000000, 0, 1, false, now(), now()
                   FROM generate_series(0, %s) c""",
                (owner, max(clients)),
            )
        script = Path(tmp) / "metric_point.sql"
        script.write_text(PGBENCH_SCRIPT)
        parts = psycopg.conninfo.conninfo_to_dict(_plain(url))
        for n in clients:
            argv = [pgbench, "-n", "-M", "prepared", "-c", str(n), "-j", str(min(n, 2)), "-T", str(seconds)]
            argv += ["-f", str(script), "-h", str(parts.get("host", "127.0.0.1")), "-p", str(parts.get("port", 5432))]
            argv += ["-U", str(parts.get("user", "postgres")), str(parts["dbname"])]
            out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
            rates[n] = float(re.search(r"tps = ([\d.]+)", out).group(1))  # type: ignore[union-attr]
            print(f"     pgbench -c {n}: {rates[n]:.0f} metric-point transactions/s", flush=True)
        with psycopg.connect(_plain(url), autocommit=True) as conn:
            conn.execute("VACUUM metric_points")  # the free-space map and visibility map, as autovacuum leaves them
            size, rows = conn.execute(
                "SELECT pg_total_relation_size('metric_points'), count(*) FROM metric_points"
            ).fetchone()  # type: ignore[misc]
    return rates, float(size) / rows if rows else 0.0


# --- the run --------------------------------------------------------------------------------
def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def run(short: bool = False) -> dict[str, Any]:
    key = generate_key().key
    window_s, rounds = (2.0, 1) if short else (10.0, 3)
    # A backend that goes idle reports its pending counters up to 10 s later (PGSTAT_IDLE_INTERVAL):
    # after a change of activity, the full run waits that out before a window opens.
    settle_s = 2.5 if short else 11.0
    print(f"== capacity: PostgreSQL and Redis cost per job, worker and watched job\n   {machine()}")
    with ExitStack() as stack:
        url = stack.enter_context(throwaway_database())
        with psycopg.connect(_plain(url), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        data = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-capacity-")))
        port = free_port()
        env = service_env(url, data, port, key)
        upgrade_database(Settings(database_url=url, data_dir=data))
        monitor = RedisMonitor(REDIS_URL)
        monitor.start()
        stack.callback(monitor.stop)
        meter = Meter(url, monitor)
        stack.callback(meter.close)

        api_log, worker_log = data / "api.log", data / "worker.log"
        api = stack.enter_context(process([str(BIN / "ddpm-jobs"), "api"], env, api_log))
        monitor.pids["api"] = api.pid
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {key}"}
        client = stack.enter_context(httpx.Client(base_url=base, timeout=60, headers=headers))
        wait_ready(client, api, api_log)
        created = client.post("/v1/jobs", json=measured_job(short))
        created.raise_for_status()
        job_id = created.json()["id"]
        events_url = f"{base}/v1/jobs/{job_id}/events"

        # 1. The API alone: a queued job (no worker yet), watched by 0, 1 and 10 clients.
        print(f"-- API: SSE watchers of one job, {rounds} x {window_s:.0f} s windows each (no worker running)")
        time.sleep(settle_s)
        for _ in range(rounds):
            meter.measure("api, no watcher", window_s)
            for n in (1, 10):
                with watchers(events_url, key, n, settle_s + window_s + 3, settle_s):
                    meter.measure(f"api, {n} watcher{'s' if n > 1 else ''}", window_s)
                time.sleep(settle_s)

        # 2. The worker trains the job.
        worker_env = env | {"OMP_NUM_THREADS": "1"}
        worker_argv = [str(BIN / WORKER_COMMAND[0]), *WORKER_COMMAND[1:]]
        worker = stack.enter_context(process(worker_argv, worker_env, worker_log))
        monitor.pids["worker"] = worker.pid
        deadline = time.monotonic() + 120
        while client.get(f"/v1/jobs/{job_id}").json()["step"] < 2 * CHECKPOINT_EVERY:  # past start-up
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(f"job {job_id} did not start training:\n{worker_log.read_text()[-3000:]}")
            time.sleep(0.5)
        time.sleep(settle_s)
        print(f"-- worker training one job (log_every {LOG_EVERY}, checkpoint_every {CHECKPOINT_EVERY}), "
              f"{rounds} x {window_s:.0f} s windows")  # fmt: skip
        train_windows = [meter.measure("training", window_s * 1.5) for _ in range(rounds)]
        client.post(f"/v1/jobs/{job_id}/cancel").raise_for_status()
        wait_status(client, job_id, {"cancelled", "failed", "succeeded"}, timeout=60, poll_s=0.2)

        # 3. The worker idle, in windows as long as the training ones, once the attempt's end
        # (its status, log lines, webhook records, the next turn) is written: on a loaded machine
        # that takes seconds, and counted as idle it would be subtracted from training.
        time.sleep(max(settle_s, 6.0))
        print(f"-- worker idle, {rounds} x {window_s * 1.5:.0f} s windows")
        idle_windows = [meter.measure("worker idle", window_s * 1.5) for _ in range(rounds)]

        with psycopg.connect(_plain(url), autocommit=True) as conn:
            sizes = conn.execute(
                """SELECT c.relname, pg_total_relation_size(c.oid), pg_relation_size(c.oid),
                          (SELECT count(*) FROM metric_points), (SELECT avg(pg_column_size(m.*)) FROM metric_points m)
                   FROM pg_class c WHERE c.relname IN ('metric_points', 'jobs', 'checkpoints')"""
            ).fetchall()
            ckpt_bytes = conn.execute("SELECT avg(size_bytes) FROM checkpoints").fetchone()[0]  # type: ignore[index]
        state_files = [p.stat().st_size for p in (data / "checkpoints").rglob("*") if p.is_file() and "state" in p.name]

    print("-- pgbench: the metric-point transaction's shape, one job row per client")
    commit_rates, row_bytes = pgbench_commit_rate([2] if short else [1, 4, 16], 2 if short else 8)
    kept = retention.measure(short)
    return report(
        meter, train_windows, idle_windows, sizes, ckpt_bytes, state_files, commit_rates, row_bytes, window_s, kept
    )


def report(
    meter: Meter,
    train_windows: list[Window],
    idle_windows: list[Window],
    sizes: list[tuple[Any, ...]],
    ckpt_bytes: float | None,
    state_files: list[int],
    commit_rates: dict[int, float] | str,
    row_bytes: float,
    window_s: float,
    retention_figures: dict[str, float] | None = None,
) -> dict[str, Any]:
    def per(windows: list[Window], fn: Any) -> float:
        return _median([fn(w) for w in windows])

    def tx(w: Window) -> int:  # transactions ended: a session closed without commit rolls back
        return w.db["xact_commit"] + w.db["xact_rollback"]

    def cls(w: Window, kind: str) -> WalClass:
        return w.wal.get(kind, WalClass())

    # API: read transactions per second per watched job (the poller is shared by its watchers).
    base_rate = per(meter.phase("api, no watcher"), lambda w: tx(w) / w.seconds)
    api = {
        name: per(meter.phase(name), lambda w: tx(w) / w.seconds) - base_rate
        for name in ("api, 1 watcher", "api, 10 watchers")
    }
    api_rows = per(meter.phase("api, 1 watcher"), lambda w: w.db["tup_returned"] / w.seconds) - per(
        meter.phase("api, no watcher"), lambda w: w.db["tup_returned"] / w.seconds
    )

    # Training: per writing transaction of each kind, exact from the WAL.
    points = sum(cls(w, "metric point").transactions for w in train_windows)
    ckpts = sum(cls(w, "checkpoint").transactions for w in train_windows)
    beats = sum(cls(w, "heartbeat").transactions for w in train_windows)
    train_s = sum(w.seconds for w in train_windows)
    idle_xact_rate = per(idle_windows, lambda w: tx(w) / w.seconds)
    train_xacts = sum(tx(w) for w in train_windows) - idle_xact_rate * train_s
    wal_no_xid = sum(cls(w, "no xid").bytes for w in train_windows)

    def mean_bytes(kind: str) -> float:
        n = sum(cls(w, kind).transactions for w in train_windows)
        return sum(cls(w, kind).bytes for w in train_windows) / n if n else 0.0

    def mean_fpi(kind: str) -> float:
        n = sum(cls(w, kind).transactions for w in train_windows)
        return sum(cls(w, kind).fpi_bytes for w in train_windows) / n if n else 0.0

    writes = points + ckpts + beats
    figures: dict[str, Any] = {
        "window_s": window_s,
        "training_s": train_s,
        "metric_points": points,
        "checkpoints": ckpts,
        "heartbeats": beats,
        "steps_per_s": points * LOG_EVERY / train_s if train_s else 0.0,
        # every transaction (committed or rolled back) while training, over its writing transactions
        "transactions_per_metric_point": train_xacts / points if points else 0.0,
        "transactions_per_writing_transaction": train_xacts / writes if writes else 0.0,
        "wal_bytes_per_metric_point": mean_bytes("metric point"),
        "wal_fpi_bytes_per_metric_point": mean_fpi("metric point"),
        "wal_bytes_per_checkpoint": mean_bytes("checkpoint"),
        "wal_bytes_per_heartbeat": mean_bytes("heartbeat"),
        "wal_bytes_no_xid_per_metric_point": wal_no_xid / points if points else 0.0,
        "tuples_written_per_metric_point": (
            sum(w.db["tup_inserted"] + w.db["tup_updated"] + w.db["tup_deleted"] for w in train_windows) / points
            if points
            else 0.0
        ),
        "worker_idle_transactions_per_s": idle_xact_rate,
        "worker_idle_redis_commands_per_s": per(idle_windows, lambda w: sum(w.redis_worker.values()) / w.seconds),
        "worker_training_redis_commands_per_s": per(train_windows, lambda w: sum(w.redis_worker.values()) / w.seconds),
        "worker_idle_redis_commands": dict(sum((w.redis_worker for w in idle_windows), Counter())),
        "api_transactions_per_s_per_watched_job_1_watcher": api["api, 1 watcher"],
        "api_transactions_per_s_per_watched_job_10_watchers": api["api, 10 watchers"],
        "api_rows_read_per_s_per_watched_job": api_rows,
        "cluster_wal_bytes_per_s_training": per(train_windows, lambda w: w.wal_cluster["wal_bytes"] / w.seconds),
        "cluster_redis_commands_per_s": per(
            meter.windows, lambda w: w.redis_cluster["total_commands_processed"] / w.seconds
        ),
        "checkpoint_file_bytes": float(ckpt_bytes or 0) + _median([float(s) for s in state_files]),
        "pgbench_metric_point_tps": commit_rates,
        # heap + primary key per row, from the pgbench database's thousands of rows
        "metric_point_bytes_on_disk": row_bytes,
    }
    for name, total, heap, rows, avg_row in sizes:
        total, heap, avg_row = float(total), float(heap), float(avg_row or 0)
        figures[f"{name}_total_bytes"] = total
        if name == "metric_points":
            figures["metric_points_rows"] = rows
            figures["metric_point_row_bytes"] = float(avg_row or 0)

    f = figures
    print(f"-- measured over {train_s:.0f} s of training: {points} metric points, {ckpts} checkpoints, "
          f"{beats} heartbeats, {f['steps_per_s']:.1f} steps/s")  # fmt: skip
    rows_out = [
        ("transactions / metric point (less the idle worker's rate)", f"{f['transactions_per_metric_point']:.2f}"),
        (
            "transactions / writing transaction (1.0: no read-only ones)",
            f"{f['transactions_per_writing_transaction']:.2f}",
        ),
        (
            "WAL bytes / metric point (this database, exact)",
            f"{f['wal_bytes_per_metric_point']:.0f} (FPI {f['wal_fpi_bytes_per_metric_point']:.0f})",
        ),
        ("WAL bytes / checkpoint row", f"{f['wal_bytes_per_checkpoint']:.0f}"),
        ("WAL bytes / heartbeat", f"{f['wal_bytes_per_heartbeat']:.0f}"),
        (
            "WAL bytes without a transaction (pruning, hints) / metric point",
            f"{f['wal_bytes_no_xid_per_metric_point']:.0f}",
        ),
        ("tuples written / metric point", f"{f['tuples_written_per_metric_point']:.2f}"),
        (
            "metric_points on disk / row (heap + index, pgbench's rows)",
            f"{f['metric_point_bytes_on_disk']:.0f} (row {f['metric_point_row_bytes']:.0f})",
        ),
        ("checkpoint files / checkpoint (tiny preset)", f"{f['checkpoint_file_bytes'] / 1e6:.1f} MB"),
        ("worker idle: transactions/s (sweeper)", f"{f['worker_idle_transactions_per_s']:.2f}"),
        (
            "worker idle: Redis commands/s",
            f"{f['worker_idle_redis_commands_per_s']:.2f} {f['worker_idle_redis_commands']}",
        ),
        ("worker training: Redis commands/s", f"{f['worker_training_redis_commands_per_s']:.2f}"),
        ("API: transactions/s per job, 1 watcher", f"{f['api_transactions_per_s_per_watched_job_1_watcher']:.2f}"),
        (
            "API: transactions/s per watched job, 10 watchers",
            f"{f['api_transactions_per_s_per_watched_job_10_watchers']:.2f}",
        ),
        ("API: rows read/s per watched job", f"{f['api_rows_read_per_s_per_watched_job']:.1f}"),
        (
            "cluster-wide (others' tests included): WAL bytes/s while training",
            f"{f['cluster_wal_bytes_per_s_training']:.0f}",
        ),
        ("cluster-wide (others' tests included): Redis commands/s", f"{f['cluster_redis_commands_per_s']:.0f}"),
        ("pgbench, metric-point transactions/s by clients", str(commit_rates)),
    ]
    width = max(len(a) for a, _ in rows_out)
    for a, b in rows_out:
        print(f"  {a:<{width}}  {b}")
    print(f"-- projected per job at log_every {LOG_EVERY}, checkpoint_every {CHECKPOINT_EVERY_DEFAULT}, "
          f"heartbeat {HEARTBEAT_S:.0f} s")  # fmt: skip
    for s in STEP_RATES:
        p = project(f, s)
        print(
            f"  {s:>3} steps/s: {p['writes_per_s']:.2f} writing transactions/s, "
            f"{p['wal_bytes_per_s'] / 1e3:.2f} kB WAL/s, {p['table_bytes_per_day'] / 1e6:.1f} MB of metric_points a day"
        )
    figures.update(retention_figures or {})
    print("JSON " + json.dumps(figures, default=str))
    return figures


def project(f: dict[str, Any], steps_per_s: float) -> dict[str, float]:
    """One job's database load at `steps_per_s`, from the per-unit figures."""
    points = steps_per_s / LOG_EVERY
    ckpts = steps_per_s / CHECKPOINT_EVERY_DEFAULT
    beats = 1 / HEARTBEAT_S
    return {
        "writes_per_s": points + ckpts + beats,
        "wal_bytes_per_s": points * (f["wal_bytes_per_metric_point"] + f["wal_bytes_no_xid_per_metric_point"])
        + ckpts * f["wal_bytes_per_checkpoint"]
        + beats * f["wal_bytes_per_heartbeat"],
        "table_bytes_per_day": points * f["metric_point_bytes_on_disk"] * 86400,
    }
