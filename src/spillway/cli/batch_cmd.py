"""``spillway batch submit | status | results | cancel``: the Batch API from the command line.

It is a client of a running gateway (``--url``, key in ``--key`` or $SPILLWAY_API_KEY), the
same calls the openai SDK makes. ``submit`` takes OpenAI batch lines, or plain request
bodies (each is given ``custom_id`` ``line-N``), fills in ``--model`` where a body has none,
and streams the file up; nothing is held whole in memory, either way.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import click
import orjson
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from spillway.cli.admin_db import REFUSED_EXIT, fail

_DONE = ("completed", "failed", "expired", "cancelled")
_url = click.option("--url", default="http://127.0.0.1:8000", show_default=True,
                    help="Where the gateway listens.")  # fmt: skip
_key = click.option("--key", envvar="SPILLWAY_API_KEY", default=None,
                    help="An API key (or $SPILLWAY_API_KEY); not needed in open mode.")  # fmt: skip


@click.group("batch")
def batch_group() -> None:
    """Submit batch jobs, follow them, fetch their results, cancel them."""


@batch_group.command("submit")
@click.argument("source", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--model", default=None, help="The model for lines whose body names none.")
@click.option("--window", default="24h", show_default=True, help="The completion window.")
@click.option("--endpoint", type=click.Choice(["/v1/chat/completions", "/v1/embeddings"]),
              default="/v1/chat/completions", show_default=True)  # fmt: skip
@_url
@_key
def submit(source: Path, model: str | None, window: str, endpoint: str, url: str,
           key: str | None) -> None:  # fmt: skip
    """Upload FILE.jsonl and start a batch on it; prints the batch id."""
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as normalised:
        count = _normalise(source, Path(normalised.name), model, endpoint)
        batch = asyncio.run(_submit(url, key, Path(normalised.name), source.name, endpoint, window))
    click.echo(batch["id"])
    click.echo(f"({count} lines; `spillway batch status {batch['id']}` follows it)", err=True)


@batch_group.command("status")
@click.argument("batch_id", required=False)
@click.option("--once", is_flag=True, help="One look, no progress bar to follow.")
@_url
@_key
def status(batch_id: str | None, once: bool, url: str, key: str | None) -> None:
    """Without an id: the recent batches. With one: its progress until it ends."""
    console = Console() if sys.stdout.isatty() else Console(width=160)
    if batch_id is None:
        page = asyncio.run(_call(url, key, "GET", "/v1/batches?limit=20"))
        console.print(_batches_table(page["data"]))
        return
    if once or not sys.stdout.isatty():
        console.print(_summary(asyncio.run(_call(url, key, "GET", f"/v1/batches/{batch_id}"))))
        return
    final = asyncio.run(_follow(url, key, batch_id, console))
    console.print(_summary(final))


@batch_group.command("results")
@click.argument("batch_id")
@click.option("-o", "--output", "target", type=click.Path(path_type=Path, dir_okay=False),
              required=True, help="Where to write the output lines.")  # fmt: skip
@_url
@_key
def results(batch_id: str, target: Path, url: str, key: str | None) -> None:
    """Download the output file (and the error file, next to it as NAME.errors.jsonl)."""
    batch = asyncio.run(_call(url, key, "GET", f"/v1/batches/{batch_id}"))
    if batch["status"] not in _DONE:
        fail(f"batch {batch_id} is {batch['status']}: its results are not ready", REFUSED_EXIT)
    written = []
    errors_path = target.with_suffix(".errors.jsonl")
    for file_id, path in ((batch["output_file_id"], target), (batch["error_file_id"], errors_path)):
        if file_id:
            size = asyncio.run(_download(url, key, file_id, path))
            written.append(f"{path} ({size:,} bytes)")
    counts = batch["request_counts"]
    click.echo(f"{batch['status']}: {counts['completed']} completed, {counts['failed']} failed")
    for line in written or ["no result files"]:
        click.echo(line)


@batch_group.command("cancel")
@click.argument("batch_id")
@_url
@_key
def cancel(batch_id: str, url: str, key: str | None) -> None:
    """Stop a batch: lines running are stopped, finished ones kept (within about 10 s)."""
    batch = asyncio.run(_call(url, key, "POST", f"/v1/batches/{batch_id}/cancel"))
    click.echo(f"{batch_id}: {batch['status']}")


def _normalise(source: Path, target: Path, model: str | None, endpoint: str) -> int:
    """OpenAI batch lines, from batch lines or bare bodies, one line at a time."""
    count = 0
    with source.open("rb") as lines, target.open("wb") as out:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                item = orjson.loads(raw)
            except orjson.JSONDecodeError:
                fail(f"{source}:{number}: not valid JSON", REFUSED_EXIT)
            if not isinstance(item, dict):
                fail(f"{source}:{number}: not a JSON object", REFUSED_EXIT)
            if "body" not in item or "custom_id" not in item:
                item = {"custom_id": f"line-{number}", "method": "POST", "url": endpoint,
                        "body": item}  # fmt: skip
            body = item.get("body")
            if isinstance(body, dict) and "model" not in body:
                if model is None:
                    fail(f"{source}:{number}: the body names no model; give --model", REFUSED_EXIT)
                body["model"] = model
            out.write(orjson.dumps(item) + b"\n")
            count += 1
    return count


async def _submit(
    url: str, key: str | None, path: Path, name: str, endpoint: str, window: str
) -> dict[str, Any]:
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    with path.open("rb") as body:
        form.add_field("file", body, filename=name, content_type="application/jsonl")
        uploaded = await _call(url, key, "POST", "/v1/files", data=form)
    request = {"input_file_id": uploaded["id"], "endpoint": endpoint, "completion_window": window}
    batch: dict[str, Any] = await _call(url, key, "POST", "/v1/batches", json=request)
    return batch


async def _call(url: str, key: str | None, method: str, path: str, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.request(method, url.rstrip("/") + path, headers=headers, **kwargs) as response,
        ):
            body = await response.read()
            if response.status >= 400:
                fail(f"{response.status}: {_message(body)}", REFUSED_EXIT)
            return orjson.loads(body)
    except aiohttp.ClientError as exc:
        fail(f"cannot reach {url}: {type(exc).__name__}", REFUSED_EXIT)


async def _download(url: str, key: str | None, file_id: str, target: Path) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    size = 0
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
    content = f"{url.rstrip('/')}/v1/files/{file_id}/content"
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.get(content, headers=headers) as response,
    ):
        if response.status >= 400:
            fail(f"{response.status}: {_message(await response.read())}", REFUSED_EXIT)
        with target.open("wb") as out:
            async for chunk in response.content.iter_chunked(1 << 20):
                out.write(chunk)
                size += len(chunk)
    return size


async def _follow(url: str, key: str | None, batch_id: str, console: Console) -> Any:
    """A progress bar, with counts and the time left at the rate seen so far."""
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[counts]}"), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(batch_id, total=None, counts="")
        while True:
            batch = await _call(url, key, "GET", f"/v1/batches/{batch_id}")
            counts = batch["request_counts"]
            done = counts["completed"] + counts["failed"]
            shown = f"{batch['status']} · {counts['completed']} ok · {counts['failed']} failed"
            progress.update(task, total=counts["total"] or None, completed=done, counts=shown)
            if batch["status"] in _DONE:
                return batch
            await asyncio.sleep(1.0)


def _summary(batch: dict[str, Any]) -> Table:
    table = Table(title=batch["id"], show_header=False)
    counts = batch["request_counts"]
    rows = [
        ("status", batch["status"]),
        ("lines", f"{counts['total']} ({counts['completed']} ok, {counts['failed']} failed)"),
        ("endpoint", batch["endpoint"]),
        ("created", _when(batch["created_at"])),
        ("expires", _when(batch["expires_at"])),
        ("output file", batch["output_file_id"] or "-"),
        ("error file", batch["error_file_id"] or "-"),
    ]
    errors = (batch.get("errors") or {}).get("data") or []
    rows += [(f"line {e.get('line')}", f"{e.get('code')}: {e.get('message')}") for e in errors[:20]]
    for name, value in rows:
        table.add_row(Text(name), Text(str(value)))
    return table


def _batches_table(batches: list[dict[str, Any]]) -> Table:
    table = Table(title="batches")
    for column in ("id", "status", "lines", "ok", "failed", "created"):
        table.add_column(column)
    for b in batches:
        c = b["request_counts"]
        cells = (b["id"], b["status"], c["total"], c["completed"], c["failed"],
                 _when(b["created_at"]))  # fmt: skip
        table.add_row(*(Text(str(cell)) for cell in cells))
    return table


def _when(stamp: int | None) -> str:
    return "-" if stamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(stamp))


def _message(body: bytes) -> str:
    try:
        return str(orjson.loads(body)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")
