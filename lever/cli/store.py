"""``lever store locks`` and ``lever store gc``: who is building what, and tidying leftovers."""

from __future__ import annotations

import json
import time
from typing import Optional

import typer

from lever.cli.app import app
from lever.cli.pipeline import STORE_HELP, _open, _store_failure

store_app = typer.Typer(help="Inspect and tidy the artifact store.", no_args_is_help=True)
app.add_typer(store_app, name="store")


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def _age(seconds: float) -> str:
    from lever.storage.lease import _ago

    return _ago(seconds)


@store_app.command("locks")
def locks_cmd(
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    show_all: bool = typer.Option(False, "--all", help="also list leases whose holder is gone or stopped renewing"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """List the units being built now: who holds each lease, since when, last heartbeat."""
    from rich.console import Console
    from rich.table import Table

    from lever.storage.lease import iter_live
    from lever.storage.store import StoreError

    st = _open(store)
    try:
        rows = [(rec, alive) for rec, alive in iter_live(st.leases()) if alive or show_all]
    except StoreError as exc:
        _store_failure(exc)
        return
    now = time.time()
    if as_json:
        typer.echo(json.dumps([{"key": r.key, "state": "live" if a else "expired", "owner": r.owner,
                                "acquired": r.acquired, "renewed": r.renewed, "ttl_s": r.ttl_s} for r, a in rows], indent=2))
        return
    if not rows:
        typer.echo(f"no {'' if show_all else 'live '}leases in {st.url}")
        return
    table = Table(title=f"leases in {st.url}")
    for col in ("unit", "state", "holder", "since", "heartbeat", "expires"):
        table.add_column(col)
    with_process = st.leases().dies_with_holder
    for rec, alive in rows:
        unit = rec.key + (f"\n{rec.owner['unit']}" if rec.owner.get("unit") else "")
        if with_process:  # an OS lock: released when its process ends, not by time
            expires = "with its process" if alive else "holder gone"
        else:
            expires = f"in {_age(rec.expires - now)}" if rec.expires > now else f"{_age(now - rec.expires)} ago"
        table.add_row(unit, "live" if alive else "expired", rec.who(), f"{_age(now - rec.acquired)} ago",
                      f"{_age(now - rec.renewed)} ago", expires)
    Console().print(table)


@store_app.command("gc")
def gc_cmd(
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    older_than: str = typer.Option("7d", "--older-than", help="only what is at least this old: 90s, 30m, 12h, 7d"),
    apply: bool = typer.Option(False, "--apply", help="remove them (default: dry run, only list)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Remove stale staging, quarantined artifacts and dead leases older than --older-than (dry run by default)."""
    from rich.console import Console
    from rich.table import Table

    from lever.storage.gc import apply_gc, parse_age, plan_gc
    from lever.storage.store import StoreError

    age = parse_age(older_than)
    st = _open(store)
    try:
        items = plan_gc(st, age)
        outcomes = apply_gc(st, items) if apply else [(g, f"kept: {g.kept}" if g.kept else "would remove") for g in items]
    except StoreError as exc:
        _store_failure(exc)
        return
    done = [g for g, o in outcomes if o in ("removed", "would remove")]
    size = sum(g.item.size for g in done)
    if as_json:
        typer.echo(json.dumps([{"kind": g.item.kind, "name": g.item.name, "age_s": round(g.age_s, 1),
                                "bytes": g.item.size, "location": g.item.location, "outcome": o}
                               for g, o in outcomes], indent=2))
        return
    if outcomes:
        table = Table(title=f"older than {older_than} in {st.url}")
        for col in ("kind", "name", "age", "size", "outcome"):
            table.add_column(col)
        for g, o in outcomes:
            table.add_row(g.item.kind, g.item.name, _age(g.age_s), _mib(g.item.size), o)
        Console().print(table)
    if apply:
        typer.echo(f"removed {len(done)} item(s), {_mib(size)}")
    else:
        typer.echo(f"dry run: {len(done)} item(s), {_mib(size)} would be removed; pass --apply to remove them")
