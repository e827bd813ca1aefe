"""The status report: what was archived, what was not and why, read from the ledger only.

`report()` builds plain data (the `--json` output, whose field names are stable and
documented in the README); `render()` draws it for a person with rich.
"""
from __future__ import annotations

from datetime import datetime, timezone

from rich.console import Console
from rich.table import Table

from imapsync.ledger import Ledger, State

#: How many not-archived copies the table lists before saying "and N more".
SHOWN_PROBLEMS = 20


def report(ledger: Ledger, account: str | None = None) -> dict:
    accounts = ledger.status(account)
    for acc in accounts:
        totals = {s.value: 0 for s in State}
        for f in acc["folders"]:
            for k, v in f["counts"].items():
                totals[k] += v
            f["lag_seconds"] = _age(f["last_sync_at"])
        acc["counts"] = totals
    problems = ledger.problems(account)
    return {"accounts": accounts, "not_archived": problems}


def _age(iso: str | None) -> int | None:
    if not iso:
        return None
    return int((datetime.now(timezone.utc) - datetime.fromisoformat(iso)).total_seconds())


def _when(iso: str | None) -> str:
    age = _age(iso)
    if age is None:
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if age >= size:
            return f"{age // size}{unit} ago"
    return f"{age}s ago"


def console() -> Console:
    """A console for reports: the terminal's width, or 120 columns when piped."""
    c = Console()
    return c if c.is_terminal else Console(width=120)


def render(data: dict, console: Console) -> None:
    if not data["accounts"]:
        console.print("No account has been synced yet: run `imapsync sync`.")
        return
    for acc in data["accounts"]:
        c = acc["counts"]
        head = (f"[bold]{acc['account']}[/] ({acc['username']} at {acc['host']}): "
                f"{c['uploaded']} uploaded, {c['duplicate']} duplicate, {c['skipped']} skipped, "
                f"{c['failed']} failed, {c['pending']} pending")
        console.print(head, highlight=False, soft_wrap=True)
        run = acc["last_run"]
        if run:
            console.print(f"  last run: {run['kind']} {_when(run['started_at'])}, {run['outcome'] or 'running'}",
                          highlight=False)
        if acc["last_error"]:
            console.print(f"  [red]error[/] {_when(acc['last_error_at'])}: {acc['last_error']}", highlight=False)
        if not acc["folders"]:
            continue
        table = Table(box=None, pad_edge=False, padding=(0, 1))
        for col in ("folder", "last uid", "uploaded", "duplicate", "skipped", "failed", "pending", "synced"):
            table.add_column(col, justify="left" if col in ("folder", "synced") else "right",
                             no_wrap=col != "folder", overflow="fold",
                             min_width=len(col) if col != "folder" else min(40, max(len(f["folder"]) for f in acc["folders"])))
        for f in acc["folders"]:
            n = f["counts"]
            table.add_row(f["folder"], str(f["last_uid"]),
                          *(str(n[k]) for k in ("uploaded", "duplicate", "skipped", "failed", "pending")),
                          _when(f["last_sync_at"]) + (f"  [red]{f['last_error']}[/]" if f["last_error"] else ""))
        console.print(table)
    problems = data["not_archived"]
    if problems:
        console.print(f"\n[bold]Not archived[/] ({len(problems)}):", highlight=False)
        for p in problems[:SHOWN_PROBLEMS]:
            console.print(f"  {p['account']} {p['folder']} uid {p['uid']}: {p['state']}"
                          f" ({p['reason'] or 'no reason recorded'})  {p['message_id'] or '(no Message-ID)'}",
                          highlight=False, markup=False, soft_wrap=True)
        if len(problems) > SHOWN_PROBLEMS:
            console.print(f"  … and {len(problems) - SHOWN_PROBLEMS} more (see --json)")
