"""The clean stage over shards on Dask, with dedup that is global across shards, and shard ledgers.

The input is cut into shards of `clean.batch_size` records (the local executor's batches). With
`clean.executor: dask` each shard is cleaned on a Dask worker (`clean_shard`): repairs, filters,
PII, length, token and language checks, and the MinHash LSH band hashes of its records, the same
functions the local executor runs. Shards come back in input order (at most two per worker
thread in flight, so memory stays flat) and are spooled (pickled) to a file inside the stage's
temporary folder; exact dedup is decided on the way, one set of content ids for all shards.

Near-dedup is global, in datatrove's three MinHash steps: signatures (per shard, on the workers),
buckets (the band hashes of every shard sorted together: records that share a band hash share a
bucket) and clusters (one pass, in input order, over the records that share a bucket with another:
a record in a bucket that holds an earlier kept record is a near duplicate; otherwise it is kept
and its buckets are marked). That is the local executor's streaming rule (first occurrence kept,
a later record near a kept one dropped, a dropped one marks nothing) over the whole input, so both
executors keep the same records, in the same order, with the same drop reasons.

Each shard's ledger (in = out + dropped by reason) goes to stats.json under `shards`, for either
executor; their sums must equal the stage's ledger before the stage is written.
"""

from __future__ import annotations

import logging
import pickle
import socket
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import numpy as np

from tuneline.curate.dedup import choose_bands
from tuneline.errors import UserError
from tuneline.pipeline import CLEAN
from tuneline.recipe import CleanSpec
from tuneline.records import Record
from tuneline.store import LedgerError, StageWriter, check_ledger_counts

SPOOL = ".shards.pickle"  # cleaned shards before near-dedup; removed before the manifest is written
CONNECT_TIMEOUT_S = 10
IN_FLIGHT_PER_THREAD = 2  # shards queued per worker thread: busy workers, bounded memory
NEAR_DUPLICATE = "near_duplicate"

Prepared = tuple[list[list[Any]], Counter[str], list[list[int] | None] | None]
CleanShard = Callable[[list[str]], Prepared]


class DaskAddressError(UserError, ConnectionError):
    """clean.dask_address names no reachable Dask scheduler (or one without workers)."""


@contextmanager
def dask_client(spec: CleanSpec) -> Iterator[Any]:
    """A client of the cluster at `clean.dask_address`, or of a local cluster of `clean.workers`
    processes (one thread each, loopback only), closed at the end."""
    from distributed import Client, LocalCluster

    with quiet_dask():
        if spec.dask_address is None:
            with (
                LocalCluster(
                    n_workers=spec.workers,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address="127.0.0.1:0",  # its HTTP server always starts: no fixed port
                    # workers' own logs: a task's error comes back here as the exception it raised,
                    # while a worker's heartbeat error at close (a race under load) would be noise
                    silence_logs=logging.CRITICAL,
                ) as cluster,
                Client(cluster, set_as_default=False) as client,
            ):
                yield client
            return
        with connect(spec.dask_address) as client:
            yield client


def connect(address: str) -> Any:
    """A client of the scheduler at `address` that has at least one worker, or a DaskAddressError."""
    from distributed import Client

    check_reachable(address)
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, ValueError) as error:
        raise unreachable(address, str(error)) from None
    try:
        client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
    except TimeoutError:
        client.close()
        raise DaskAddressError(
            f"clean.dask_address {address!r}: the scheduler has no workers after {CONNECT_TIMEOUT_S} s; "
            f"start `dask worker {address}` on each host (with this Tuneline installed)"
        ) from None
    return client


@contextmanager
def quiet_dask() -> Iterator[None]:
    """Dask's INFO lines (scheduler, nanny and worker start and stop) stay out of the run's log
    while the stage runs; warnings and errors still show."""
    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def check_reachable(address: str) -> None:
    """Fail at once, with the fix, when nothing listens at a TCP scheduler address (Dask's own
    client retries until its timeout and then leaves a client behind that is slow to close)."""
    from distributed.comm import parse_address
    from distributed.comm.addressing import parse_host_port

    try:
        scheme, location = parse_address(address)
        host, port = parse_host_port(location)
    except ValueError as error:
        raise unreachable(address, str(error)) from None
    if scheme not in ("tcp", "tls"):
        return
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise unreachable(address, str(error) or type(error).__name__) from None


def unreachable(address: str, why: str) -> DaskAddressError:
    """The error for an address where no scheduler answers: the field, the value, the fix."""
    return DaskAddressError(
        f"clean.dask_address {address!r}: no Dask scheduler reachable there ({why}); start one "
        "(`dask scheduler`, then `dask worker tcp://HOST:8786` on each host) and give its address "
        "as tcp://HOST:8786, or remove clean.dask_address to run a local Dask cluster of "
        "clean.workers processes"
    )


def cleaned_shards(
    client: Any, batches: Iterable[list[str]], clean_shard: CleanShard
) -> Iterator[tuple[int, Prepared]]:
    """(shard length, cleaned shard) in input order, `clean_shard` run on the cluster's workers
    with a bounded number of shards in flight (the input is read lazily, never whole)."""
    window = IN_FLIGHT_PER_THREAD * max(sum(client.nthreads().values()), 1)
    pending: deque[tuple[int, Any]] = deque()
    for lines in batches:
        pending.append((len(lines), client.submit(clean_shard, lines, pure=False)))
        if len(pending) >= window:
            size, future = pending.popleft()
            yield size, future.result()
    while pending:
        size, future = pending.popleft()
        yield size, future.result()


def write_sharded(
    writer: StageWriter, spec: CleanSpec, batches: Iterable[list[str]], clean_shard: CleanShard
) -> tuple[Counter[str], list[dict[str, Any]]]:
    """Write the clean stage's records and rejects with `clean_shard` run on Dask for each batch of
    JSON lines: spool the cleaned shards (exact dedup on the way), decide near duplicates over all
    shards, then write. Returns the repair counts and every shard's ledger."""
    spool_path = writer.path(SPOOL)
    with dask_client(spec) as client, open(spool_path, "wb") as spool:
        repairs, sizes, candidates = spool_shards(spool, spec, cleaned_shards(client, batches, clean_shard))
    near = near_duplicates(*candidates)
    ledgers = []
    with open(spool_path, "rb") as spool:
        for size in sizes:
            writer.count_in(size)
            start = writer.records_in - size
            shard = pickle.load(spool)
            for position, item in enumerate(shard, start):
                if position in near:
                    item[1] = NEAR_DUPLICATE
            ledgers.append(write_shard(writer, shard))
    spool_path.unlink()
    return repairs, ledgers


def spool_shards(
    spool: BinaryIO, spec: CleanSpec, shards: Iterable[tuple[int, Prepared]]
) -> tuple[Counter[str], list[int], tuple[np.ndarray, np.ndarray]]:
    """Pickle each cleaned shard to `spool` after exact dedup against every earlier shard; the
    repair counts, shard sizes, and the near-dedup candidates (input positions of the records
    kept so far that have words, and their LSH band hashes)."""
    repairs: Counter[str] = Counter()
    sizes: list[int] = []
    seen: set[str] = set()
    bands = choose_bands(spec.near_dedup_permutations, spec.near_dedup_threshold)
    indices: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    keys: list[np.ndarray] = [np.zeros((0, bands), dtype=np.uint64)]
    for size, (results, shard_repairs, shard_keys) in shards:
        repairs.update(shard_repairs)
        if spec.dedup:
            drop_exact_duplicates(results, seen)
        pickle.dump(results, spool, protocol=pickle.HIGHEST_PROTOCOL)
        if shard_keys is not None:
            picked = [i for i, item in enumerate(results) if item[1] is None and shard_keys[i] is not None]
            indices.append(np.array(picked, dtype=np.int64) + sum(sizes))
            rows = [shard_keys[i] for i in picked]
            keys.append(np.array(rows, dtype=np.uint64).reshape(len(picked), bands))
        sizes.append(size)
    return repairs, sizes, (np.concatenate(indices), np.concatenate(keys))


def drop_exact_duplicates(results: list[list[Any]], seen: set[str]) -> None:
    """Mark each surviving record whose content id an earlier one had (`seen`, every shard so far)."""
    for item in results:
        if item[1] is None:
            if item[0]["id"] in seen:
                item[1] = "duplicate"
            seen.add(item[0]["id"])


def near_duplicates(indices: np.ndarray, keys: np.ndarray) -> set[int]:
    """Global near-dedup over every shard's candidates (input positions `indices`, their LSH band
    hashes `keys`, one row each, in input order): buckets, then clusters; the positions dropped."""
    if not indices.size:
        return set()
    flat, owner = keys.ravel(), np.repeat(indices, keys.shape[1])
    order = np.argsort(flat)  # buckets: equal band hashes side by side
    flat, owner = flat[order], owner[order]
    starts = np.flatnonzero(np.concatenate(([True], flat[1:] != flat[:-1])))
    sizes = np.diff(np.append(starts, flat.size))
    bucket = np.repeat(np.arange(starts.size), sizes)
    shared = np.repeat(sizes >= 2, sizes)  # a bucket of one record decides nothing
    owner, bucket = owner[shared], bucket[shared]
    if not owner.size:
        return set()
    order = np.lexsort((bucket, owner))  # clusters: the records of shared buckets in input order
    owner, bucket = owner[order], bucket[order]
    firsts = np.flatnonzero(np.concatenate(([True], owner[1:] != owner[:-1])))
    ends = np.append(firsts[1:], owner.size).tolist()
    buckets = bucket.tolist()
    dropped: set[int] = set()
    kept_buckets: set[int] = set()
    for record, start, end in zip(owner[firsts].tolist(), firsts.tolist(), ends, strict=True):
        mine = buckets[start:end]
        if kept_buckets.isdisjoint(mine):
            kept_buckets.update(mine)
        else:
            dropped.add(record)
    return dropped


def write_shard(writer: StageWriter, results: list[tuple[Record, str | None]]) -> dict[str, Any]:
    """Write one cleaned shard's records (kept) and rejects (dropped, with reason); its ledger."""
    dropped: Counter[str] = Counter()
    for record, reason in results:
        if reason:
            writer.drop(record, reason)
            dropped[reason] += 1
        else:
            writer.keep(record)
    out = len(results) - sum(dropped.values())
    return {"in": len(results), "out": out, "dropped": dict(sorted(dropped.items()))}


def finish_stats(writer: StageWriter, repairs: dict[str, Any], ledgers: list[dict[str, Any]]) -> None:
    """The stage's stats.json: its ledger, repairs, and every shard's ledger, checked first: each
    shard's adds up and their sums are the stage's."""
    for index, ledger in enumerate(ledgers):
        check_ledger_counts(f"{CLEAN.name} shard {index}", ledger["in"], ledger["out"], ledger["dropped"])
    total_dropped: Counter[str] = Counter()
    for ledger in ledgers:
        total_dropped.update(ledger["dropped"])
    sums = (sum(x["in"] for x in ledgers), sum(x["out"] for x in ledgers), dict(total_dropped))
    if sums != (writer.records_in, writer.records_out, dict(writer.dropped)):
        raise LedgerError(
            f"stage {CLEAN.name}: the shard ledgers add up to in {sums[0]}, out {sums[1]}, dropped "
            f"{sums[2]}, but the stage counted in {writer.records_in}, out {writer.records_out}, "
            f"dropped {dict(writer.dropped)}; a record was lost or invented between shards"
        )
    writer.stats = {
        "kept": writer.records_out,
        "dropped": dict(writer.dropped),
        **repairs,
        "shards": ledgers,
    }
