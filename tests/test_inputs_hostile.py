"""Hostile inputs (issue 13): decompression bombs, arrays on one line, archives under a dataset's
name, and local paths no retry can fix.

Bombs are small here: a few MB of zeros against a 1 MB `max_unpacked_bytes`, or against the default
`max_ratio` (zeros deflate about 1,000x); nothing writes more than a few MB.
"""

import bz2
import errno
import gzip
import io
import json
import lzma
import os
import struct
import tarfile
import tracemalloc
import zipfile

import pytest

from tuneline.formats import FormatError, UnpackLimitError, UnpackLimits, iter_json_values, read_records
from tuneline.formats import arrays as array_reader
from tuneline.recipe import FileSource, UrlSource
from tuneline.sources import unpack as unpacker
from tuneline.sources.collect import run_collect
from tuneline.sources.download import download
from tuneline.sources.errors import SourceError, SourceUnreachable, source_os_error
from tuneline.sources.fetch import run_fetch

ZEROS = b"\0" * 5_000_000
ROW = {"instruction": "say hi", "input": "", "output": "hi"}


def alpaca_lines(n: int) -> bytes:
    return "".join(json.dumps({**ROW, "output": f"answer {i}"}) + "\n" for i in range(n)).encode()


def leftovers(store):
    """Every file under the store but its lock files: what a failed fetch or collect left behind."""
    files = (p.relative_to(store) for p in store.rglob("*") if p.is_file())
    return sorted(str(p) for p in files if p.parts[0] != "locks")


def zip_bytes(members, method=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(members) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# --- item 3: decompression is bounded --------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("bomb.jsonl.gz", gzip.compress(ZEROS)),
        ("bomb.jsonl.bz2", bz2.compress(ZEROS)),
        ("bomb.jsonl.xz", lzma.compress(ZEROS)),
        ("bomb.zip", zip_bytes({"data.jsonl": ZEROS})),
        ("bomb.tar.gz", gzip.compress(tar_bytes({"data.jsonl": ZEROS}))),
    ],
)
def test_a_url_source_past_max_unpacked_bytes_fails_naming_source_limit_and_fix(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    store = tmp_path / "store"
    source = UrlSource(
        name="bomb", url=(tmp_path / name).as_uri(), max_unpacked_bytes=1_000_000, max_ratio=1e6
    )
    with pytest.raises(SourceError) as error:
        run_fetch(store, source)
    message = str(error.value)
    assert message.startswith(f"source 'bomb': {source.url}")
    assert "1000000" in message and "raise `max_unpacked_bytes` on its source in the recipe" in message
    assert not isinstance(error.value, SourceUnreachable), "no retry unpacks it differently"
    assert leftovers(store) == [], "no partial file, no stage, no download"


def test_the_default_ratio_stops_a_gzip_bomb_after_about_a_mebibyte(tmp_path):
    (tmp_path / "zeros.jsonl.gz").write_bytes(gzip.compress(ZEROS))
    store = tmp_path / "store"
    with pytest.raises(SourceError, match=r"more than 100 times its compressed size .*raise `max_ratio`"):
        run_fetch(store, UrlSource(name="z", url=(tmp_path / "zeros.jsonl.gz").as_uri()))
    assert leftovers(store) == []


def test_a_zip_is_refused_on_its_declared_sizes_before_anything_is_written(tmp_path, monkeypatch):
    (tmp_path / "bomb.zip").write_bytes(zip_bytes({"a.jsonl": ZEROS}))
    written = []
    monkeypatch.setattr(unpacker, "_copy", lambda source, target: written.append(target))
    with pytest.raises(UnpackLimitError, match=r"its members declare 4.8 MiB .*max_ratio \(100\)"):
        unpacker.unpack(tmp_path / "bomb.zip", "bomb.zip", tmp_path / "out", UnpackLimits(), "bomb.zip")
    assert written == []


def test_a_zip_member_is_bounded_as_streamed_when_its_declared_size_passes(tmp_path, monkeypatch):
    (tmp_path / "bomb.zip").write_bytes(zip_bytes({"a.jsonl": ZEROS}))
    monkeypatch.setattr(unpacker, "_check_declared", lambda *args: None)  # a directory that lies
    with pytest.raises(UnpackLimitError, match="unpacks to more than 1000.0 KiB"):
        unpacker.unpack(
            tmp_path / "bomb.zip", "bomb.zip", tmp_path / "out", UnpackLimits(1_024_000, 1e6), "bomb.zip"
        )
    assert (tmp_path / "out" / "000-a.jsonl").stat().st_size <= 1_024_000 + (1 << 16)


def test_a_zip_whose_directory_understates_a_member_is_refused_as_broken(tmp_path):
    data = zip_bytes({"a.jsonl": ZEROS}).replace(struct.pack("<I", len(ZEROS)), struct.pack("<I", 1000))
    (tmp_path / "liar.zip").write_bytes(data)
    store = tmp_path / "store"
    with pytest.raises(SourceError, match="source 'liar': .*cannot be unpacked .*CRC"):
        run_fetch(store, UrlSource(name="liar", url=(tmp_path / "liar.zip").as_uri()))
    assert leftovers(store) == []


def test_a_compressed_local_file_source_is_bounded_too(tmp_path):
    path = tmp_path / "bomb.jsonl.gz"
    path.write_bytes(gzip.compress(alpaca_lines(3) + b" " * 3_000_000))
    store = tmp_path / "store"
    source = FileSource(name="local", path=str(path), max_unpacked_bytes=1_000_000)
    with pytest.raises(
        SourceError, match=r"source 'local': .*bomb.jsonl.gz: unpacks to more than .*max_unpacked"
    ):
        run_collect(store, [source])
    assert not (store / "stages" / "collect").exists() or not any((store / "stages" / "collect").iterdir())
    with pytest.raises(SourceError, match="max_ratio"):  # spaces compress ~1,000x: past the default
        run_collect(store, [FileSource(name="local", path=str(path))])
    assert len(read_records(path, limits=UnpackLimits(max_ratio=5000)).records) == 3
    assert run_collect(store, [FileSource(name="local", path=str(path), max_ratio=5000)])


# --- item 5: a JSON array is streamed whatever its line layout -------------------------------


def test_a_one_line_json_array_is_read_element_by_element(tmp_path, monkeypatch):
    monkeypatch.setattr(array_reader, "BLOCK_BYTES", 64)  # many blocks, cut mid-character too
    monkeypatch.setattr("tuneline.formats.BLOCK_BYTES", 64)
    monkeypatch.setattr("tuneline.formats.MAX_LINE_BYTES", 100)  # the array's line is far longer
    rows = [{**ROW, "output": f"é {i} 😀"} for i in range(300)]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows[:150] + [7] + rows[150:], ensure_ascii=False), encoding="utf-8")
    result = read_records(path)
    assert [r["messages"][-1]["content"] for r in result.records] == [row["output"] for row in rows]
    assert result.rejects == [f"{path}:1: expected a JSON object, got number (array element 150)"]


def test_bad_utf8_in_a_one_line_array_costs_one_element(tmp_path):
    good = json.dumps(ROW).encode()
    path = tmp_path / "a.json"
    path.write_bytes(b"[" + good + b", " + good.replace(b"say", b"s\xffy") + b", " + good + b"]")
    result = read_records(path)
    assert len(result.records) == 2
    column = len(b"[" + good + b', {"instruction": "s')
    assert result.rejects == [f"{path}:1: invalid UTF-8 at byte {column} of line 1 (0xff) (array element 1)"]


def test_an_array_element_too_long_to_hold_ends_the_array_with_a_reject(tmp_path, monkeypatch):
    monkeypatch.setattr(array_reader, "MAX_ELEMENT_BYTES", 200_000)
    path = tmp_path / "a.json"
    path.write_text(json.dumps([ROW, {**ROW, "output": "x" * 300_000}, ROW]))
    result = read_records(path)
    assert len(result.records) == 1
    assert result.rejects == [
        f"{path}:1: array element 1 is longer than 200000 bytes; not read, "
        "and the rest of the array cannot be read"
    ]


def test_ijson_runs_on_its_c_backend():
    assert array_reader.ijson.backend == "yajl2_c", "the pure-Python backend is ~10x slower"


def test_array_numbers_are_floats_and_memory_stays_flat(tmp_path):
    path = tmp_path / "big.json"
    element = {**ROW, "output": "y" * 1000, "weight": 0.5}
    path.write_text(json.dumps([element] * 8000))  # 8.5 MB on one line
    tracemalloc.start()
    values = iter_json_values(str(path))
    first = next(values).value
    count = 1 + sum(1 for _ in values)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 8000 and type(first["weight"]) is float
    assert peak < 3_000_000, f"read a {path.stat().st_size} byte array with a peak of {peak} bytes"


# --- item 7: what a file is comes from its content, not its name ------------------------------


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (zip_bytes({"a.jsonl": alpaca_lines(30)}, zipfile.ZIP_STORED), "zip"),
        (tar_bytes({"a.jsonl": alpaca_lines(30)}), "tar"),
        (b"7z\xbc\xaf\x27\x1c" + b"\0" * 100, "7z"),
        (b"Rar!\x1a\x07\x01\x00" + b"\0" * 100, "rar"),
    ],
)
def test_an_archive_named_json_is_refused_naming_the_file_and_what_it_is(tmp_path, data, kind):
    path = tmp_path / "data.json"
    path.write_bytes(data)
    store = tmp_path / "store"
    with pytest.raises(SourceError) as error:
        run_collect(store, [FileSource(name="disguised", path=str(path))])
    assert str(error.value) == (
        f"source 'disguised': {path}: is a {kind} archive, not JSON or JSON lines, whatever its name says; "
        "unpack it and point the source at the dataset file inside, or fetch it with a `kind: url` "
        "source (which unpacks zip and tar archives)"
    )


def test_compressed_files_are_read_whatever_their_name(tmp_path):
    for name, data in [
        ("gz.json", gzip.compress(alpaca_lines(4))),
        ("xz.jsonl", lzma.compress(alpaca_lines(4))),
        ("plain.jsonl.gz", alpaca_lines(4)),  # named gzip, but plain text
    ]:
        (tmp_path / name).write_bytes(data)
        assert len(read_records(tmp_path / name).records) == 4, name
    (tmp_path / "tar.jsonl.gz").write_bytes(gzip.compress(tar_bytes({"a.jsonl": alpaca_lines(4)})))
    with pytest.raises(FormatError, match=r"tar.jsonl.gz: is a tar archive inside gzip"):
        read_records(tmp_path / "tar.jsonl.gz")


def test_a_url_source_unpacks_an_archive_named_json(tmp_path):
    (tmp_path / "data.json").write_bytes(
        zip_bytes({"part.jsonl": alpaca_lines(30), "README.md": b"hi"}, zipfile.ZIP_STORED)
    )
    (tmp_path / "t.jsonl").write_bytes(bz2.compress(tar_bytes({"x/part.json": json.dumps([ROW]).encode()})))
    sources = [
        UrlSource(name="zip", url=(tmp_path / "data.json").as_uri()),
        UrlSource(name="tar", url=(tmp_path / "t.jsonl").as_uri()),
    ]
    from tuneline.store import read_stats

    counts = read_stats(run_collect(tmp_path / "store", sources))["sources"]
    assert (counts["zip"]["records"], counts["tar"]["records"]) == (30, 1)
    assert counts["zip"]["dropped"] == {}


# --- item 10a: local errors no retry can fix are final and named ------------------------------


def test_a_symlink_loop_is_a_final_error_naming_the_path(tmp_path):
    loop = tmp_path / "loop.jsonl"
    os.symlink(tmp_path / "other", loop)
    os.symlink(loop, tmp_path / "other")
    with pytest.raises(SourceError) as error:
        run_fetch(tmp_path / "store", FileSource(name="loopy", path=str(loop)))
    assert not isinstance(error.value, SourceUnreachable)
    assert str(error.value).startswith(f"source 'loopy': {loop}: symlink loop (")
    assert str(error.value).endswith("fix the links or point the source at the real file")
    with pytest.raises(SourceError, match="symlink loop") as error:  # also as a file:// download
        download(loop.as_uri(), tmp_path / "x.part", name="loopy", retries=3, backoff_s=60)
    assert not isinstance(error.value, SourceUnreachable)


def test_a_pipe_is_refused_rather_than_read_forever(tmp_path):
    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(SourceError, match="is not a regular file"):
        run_fetch(tmp_path / "store", FileSource(name="p", path=str(tmp_path / "pipe.jsonl")))


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (PermissionError(errno.EACCES, "Permission denied"), "permission denied (Permission denied)"),
        (IsADirectoryError(errno.EISDIR, "Is a directory"), "is a folder (Is a directory); name a file"),
        (OSError(errno.ELOOP, "Too many levels of symbolic links"), "symlink loop"),
    ],
)
def test_local_os_errors_that_no_retry_fixes_are_final(error, words):
    final = source_os_error("s", "/data/x.jsonl", error)
    assert type(final) is SourceError and f"source 's': /data/x.jsonl: {words}" in str(final)
    assert (
        type(source_os_error("s", "/x", ConnectionResetError(errno.ECONNRESET, "reset"))) is SourceUnreachable
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_a_final_error(tmp_path):
    path = tmp_path / "secret.jsonl"
    path.write_bytes(alpaca_lines(1))
    path.chmod(0)
    with pytest.raises(SourceError, match="permission denied") as error:
        run_fetch(tmp_path / "store", FileSource(name="s", path=str(path)))
    assert not isinstance(error.value, SourceUnreachable)


def test_the_fetch_task_does_not_retry_a_symlink_loop(tmp_path, prefect_server, monkeypatch):
    from prefect import flow
    from tuneline.tasks import stages

    calls = []
    real_fetch = stages.run_fetch
    monkeypatch.setattr(stages, "run_fetch", lambda *args: calls.append(1) or real_fetch(*args))
    loop = tmp_path / "loop.jsonl"
    os.symlink(loop, loop)
    quick_fetch = stages.fetch.with_options(retry_delay_seconds=0)

    @flow
    def fetch_one(source):
        return quick_fetch(tmp_path / "store", source)

    with pytest.raises(SourceError, match="symlink loop"):
        fetch_one(FileSource(name="loopy", path=str(loop)))
    assert len(calls) == 1
