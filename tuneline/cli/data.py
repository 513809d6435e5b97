"""`tuneline data ...`: look into a dataset file and convert it between formats.

Both commands print plain lines a person can grep: every unreadable record as `FILE:LINE: reason`.
Exit codes: 0 when everything was read (and held by the target), 1 when some record was
unreadable or could not be held, or the file holds no record at all (empty, blank, `[]`), 2 when
the file itself cannot be used (missing, unknown format).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, NoReturn

import fsspec
import typer
from fsspec.utils import infer_compression

from tuneline.formats import (
    WRITABLE_FORMATS,
    Format,
    FormatError,
    is_json_array_path,
    iter_file,
    read_records,
    write_stream,
)
from tuneline.records import Record

data_app = typer.Typer(help="Inspect and convert dataset files.", no_args_is_help=True)

FormatOption = Annotated[
    Format | None,
    typer.Option("--format", help="Format of the input file; detected from its first object when left out."),
]


def _fail(message: str) -> NoReturn:
    """Print a one-line error (no traceback) and exit 2: the file itself cannot be used."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _fail_empty(path: str) -> NoReturn:
    """Print the error for a file that holds no record at all and exit 1, like unreadable records."""
    typer.echo(
        f"error: {path}: holds no records (the file is empty, blank or an empty JSON array); "
        "give it at least one record (a JSON object per line, or a JSON array of them) or, in a "
        ".txt/.md file, some text",
        err=True,
    )
    raise typer.Exit(1)


def _file_error(path: str, error: Exception) -> str:
    """One line for an error that stops a whole file: the file, what is wrong, and the fix."""
    if isinstance(error, FileNotFoundError):
        return f"{error.filename or path}: no such file or folder; check the path"
    if isinstance(error, OSError):
        return f"{error.filename or path}: cannot use: {error.strerror or error}"
    return str(error)


@data_app.command("inspect")
def inspect_command(
    file: Annotated[str, typer.Argument(help="Dataset file: local path or fsspec URL.")],
    format: FormatOption = None,
) -> None:
    """Show a file's format, record and turn counts (document count for text), and every
    unreadable record as FILE:LINE: reason."""
    try:
        result = read_records(file, format)
    except (FormatError, OSError) as error:
        _fail(_file_error(file, error))
    if not result.records and not result.documents and not result.rejects:
        _fail_empty(file)
    if result.format == Format.TEXT:
        typer.echo("format: text (documents)")
        typer.echo(f"documents: {len(result.documents)}")
        typer.echo(f"characters: {sum(len(document['text']) for document in result.documents)}")
    else:
        typer.echo(f"format: {result.format or 'none (no JSON object in the file)'}")
        typer.echo(f"records: {len(result.records)}")
        typer.echo(f"turns: {sum(len(record['messages']) for record in result.records)}")
    typer.echo(f"unreadable: {len(result.rejects)}")
    for reject in result.rejects:
        typer.echo(reject)
    raise typer.Exit(1 if result.rejects else 0)


def _records_only(file: str, format: Format | None, rejects: list[tuple[str, str]]) -> Iterator[Record]:
    """The readable records of a file, streamed; unreadable ones go to `rejects` as (FILE:LINE, reason)."""
    for item in iter_file(file, format):
        if item.record is None:
            rejects.append((f"{file}:{item.line}", item.reason or ""))
        else:
            yield item.record


def _print_counts(title: str, counts: Counter[str]) -> None:
    """A heading and one `count × reason` line per reason, most frequent first."""
    if counts:
        typer.echo(title)
        for reason, count in counts.most_common():
            typer.echo(f"  {count} × {reason}")


@data_app.command("convert")
def convert_command(
    in_path: Annotated[
        str, typer.Argument(metavar="IN", help="Input dataset file: local path or fsspec URL.")
    ],
    out_path: Annotated[
        Path, typer.Argument(metavar="OUT", help="Output file: .json writes a JSON array, else JSON lines.")
    ],
    to: Annotated[Format, typer.Option("--to", help="Target format.")],
    format: FormatOption = None,
) -> None:
    """Convert a dataset file to another format; report what the target could not hold."""
    if to not in WRITABLE_FORMATS:
        _fail(f"--to {to}: Tuneline does not write {to}; use one of {', '.join(WRITABLE_FORMATS)}")
    rejects: list[tuple[str, str]] = []
    tmp_path = out_path.with_name(out_path.name + ".tmp")
    try:
        # Compression and layout follow OUT's name (out.jsonl.gz, out.json), not the temporary file's.
        with fsspec.open(str(tmp_path), "wb", compression=infer_compression(out_path.name)) as stream:
            records = _records_only(in_path, format, rejects)
            result = write_stream(records, stream, to, is_json_array_path(out_path.name))
        os.replace(tmp_path, out_path)
    except (FormatError, OSError) as error:
        _fail(_file_error(in_path, error))
    finally:
        tmp_path.unlink(missing_ok=True)
    if not result.written and not rejects and not result.unconverted:
        out_path.unlink()  # nothing was converted: no empty file left to mistake for a dataset
        _fail_empty(in_path)
    typer.echo(f"wrote {result.written} records to {out_path} as {to}")
    # Records that could not be read are not converted either: one list, read reasons first.
    unconverted = [*rejects, *result.unconverted]
    _print_counts("lost in converted records:", result.losses)
    _print_counts("not converted:", Counter(reason for _, reason in unconverted))
    for where, reason in unconverted:
        typer.echo(f"{where}: {reason}")
    raise typer.Exit(1 if rejects or result.losses or result.unconverted else 0)


@data_app.command("check")
def check_command(
    file: Annotated[str, typer.Argument(help="Dataset file: local path or fsspec URL.")],
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe", help="Recipe whose clean, gate and model sections apply; defaults otherwise."
        ),
    ] = None,
    format: FormatOption = None,
) -> None:
    """Run the cleaning report and the quality gate on a file, outside a flow.

    Exit 0 when the gate passes, 1 when it fails, 2 when the file or recipe cannot be used.
    """
    from tuneline.curate.check import check_file
    from tuneline.errors import UserError
    from tuneline.recipe import CleanSpec, GateSpec, load_recipe

    try:
        loaded = load_recipe(recipe) if recipe else None
        clean = loaded.clean if loaded else CleanSpec()
        gate = loaded.gate if loaded else GateSpec()
        report = check_file(file, clean, gate, loaded.model if loaded else None, format)
    except (FormatError, OSError, UserError) as error:
        _fail(_file_error(file, error))
    if not report.records_in:
        _fail_empty(file)
    dropped = sum(report.dropped.values())
    typer.echo(f"records in: {report.records_in}")
    typer.echo(f"unreadable: {len(report.unreadable)}")
    for line in report.unreadable:
        typer.echo(f"  {line}")
    _print_counts(f"dropped by clean: {dropped}", report.dropped)
    for kind, counts in report.clean_stats.items():
        shown = ", ".join(f"{key}: {value}" for key, value in counts.items() if value) or "-"
        typer.echo(f"{kind.replace('_', ' ')}: {shown}")
    typer.echo(f"records out: {report.kept}")
    if report.passed:
        typer.echo(f"quality gate ({gate.suite}): passed, {report.gate_expectations} expectations")
        raise typer.Exit(0)
    typer.echo(f"quality gate ({gate.suite}): FAILED")
    for failure in report.gate_failures:
        typer.echo(f"  - {failure}")
    raise typer.Exit(1)
