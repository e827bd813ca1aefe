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
    backoffs = ledger.backoffs()
    for acc in accounts:
        failures, until = backoffs.get(acc["account"], (0, None))
        acc["failures"] = failures  # failed passes in a row (imapsync run backs off)
        acc["backoff_until"] = until.replace(tzinfo=timezone.utc).isoformat(timespec="seconds") if until else None
        totals = {s.value: 0 for s in State}
        for f in acc["folders"]:
            for k, v in f["counts"].items():
                totals[k] += v
            f["lag_seconds"] = _age(f["last_sync_at"])
        acc["counts"] = totals
    problems = ledger.problems(account)
    # Tenants span accounts: their lines are part of the whole report only (one index scan).
    tenant_rows = [] if account else ledger.tenant_totals()
    return {"accounts": accounts, "not_archived": problems, "tenants": tenant_rows}


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
        if acc.get("backoff_until") and (_age(acc["backoff_until"]) or 0) <= 0:
            console.print(f"  backing off until {acc['backoff_until']} ({acc['failures']} failure(s) in a row)",
                          highlight=False)
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
    if data.get("tenants"):
        console.print()
        render_tenants(data["tenants"], console)
    problems = data["not_archived"]
    if problems:
        console.print(f"\n[bold]Not archived[/] ({len(problems)}):", highlight=False)
        for p in problems[:SHOWN_PROBLEMS]:
            console.print(f"  {p['account']} {p['folder']} uid {p['uid']}: {p['state']}"
                          f" ({p['reason'] or 'no reason recorded'})  {p['message_id'] or '(no Message-ID)'}",
                          highlight=False, markup=False, soft_wrap=True)
        if len(problems) > SHOWN_PROBLEMS:
            console.print(f"  … and {len(problems) - SHOWN_PROBLEMS} more (see --json)")


# ----- the queries: --failed, --runs, --message, and the line per tenant ------------------
# Their --json field names are stable and documented in the README ("Status queries").

#: What --failed lists: each copy not archived for a reason (pending ones are in `status`).
FAILED_STATES = (State.FAILED, State.SKIPPED)
_COPY_FIELDS = ("account", "folder", "uidvalidity", "uid", "message_id", "size", "date", "state", "reason",
                "attempts", "last_error", "seen_at")


def failed(ledger: Ledger, account: str | None = None, reason: str | None = None, limit: int = 1000) -> dict:
    rows, total = ledger.copies_in_states(FAILED_STATES, account, reason, limit)
    return {"failed": [{k: r[k] for k in _COPY_FIELDS} for r in rows], "total": total,
            "truncated": total > len(rows)}


def runs(ledger: Ledger, account: str | None = None, kind: str | None = None, limit: int = 50) -> dict:
    return {"runs": ledger.runs(account, kind, limit)}


def message(ledger: Ledger, query: str) -> dict:
    """Where a message (by Message-ID, with or without <>) was seen and which vaults it reached."""
    from imapsync.message import message_key, normalize_message_id

    text = query.strip()
    bare = text[1:-1].strip() if text.startswith("<") and text.endswith(">") else text
    ids = {text, bare, f"<{bare}>"}
    key_range = None
    norm = normalize_message_id(text)
    if norm:  # the same Message-ID written differently (domain case, spaces) has the same key prefix
        prefix = message_key(norm, "", "", "").rsplit(":", 1)[0] + ":"
        key_range = (prefix, prefix + "f" * 12)
    found = [m for m in ledger.messages_by_id(ids, key_range)
             if m["message_id"] in ids or (key_range and m["key"].startswith(key_range[0]))]
    return {"query": query, "messages": found}


def tenants(ledger: Ledger) -> list[dict]:
    return ledger.tenant_totals()


def tenant_line(t: dict) -> str:
    return (f"tenant {t['tenant']}: {t['messages']} messages archived in {t['vaults']} vault(s), "
            f"{t['deliveries']} deliveries, last upload {_when(t['last_upload_at'])}")


def render_tenants(rows: list[dict], console: Console) -> None:
    for t in rows:
        console.print(tenant_line(t), highlight=False, markup=False, soft_wrap=True)


def render_failed(data: dict, console: Console) -> None:
    """One line per copy (a table would fold Message-IDs and errors into unreadable columns)."""
    if not data["failed"]:
        console.print("No failed or skipped message.")
        return
    for r in data["failed"]:
        line = (f"{r['account']} {r['folder']} uid {r['uid']}: {r['state']} ({r['reason'] or 'no reason recorded'}), "
                f"{r['attempts'] or 0} attempt(s), {r['size']} bytes, dated {r['date'] or '?'}  "
                f"{r['message_id'] or '(no Message-ID)'}")
        if r["last_error"]:
            line += f"  last error: {r['last_error']}"
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    if data["truncated"]:
        console.print(f"… {data['total'] - len(data['failed'])} more (use --limit or --json)")


def render_runs(data: dict, console: Console) -> None:
    if not data["runs"]:
        console.print("No run yet.")
        return
    table = Table(box=None, pad_edge=False, padding=(0, 1))
    for col in ("id", "kind", "account", "started", "duration", "outcome", "uploaded", "duplicate", "skipped",
                "failed", "pending", "bytes", "error"):
        table.add_column(col, justify="right" if col in ("id", "uploaded", "duplicate", "skipped", "failed",
                                                          "pending", "bytes") else "left", overflow="fold")
    for r in data["runs"]:
        duration = r["duration_seconds"]
        table.add_row(str(r["id"]), r["kind"], r["account"], r["started_at"] or "",
                      f"{duration:.1f}s" if duration is not None else "running", r["outcome"] or "running",
                      *(str(r[k]) for k in ("uploaded", "duplicate", "skipped", "failed", "pending", "bytes")),
                      r["error"] or "")
    console.print(table)


def render_message(data: dict, console: Console) -> None:
    if not data["messages"]:
        console.print(f"{data['query']}: not in the ledger", highlight=False, markup=False)
        return
    for m in data["messages"]:
        console.print(f"{m['message_id'] or m['key']}: {m['state']}"
                      f"{' (' + m['reason'] + ')' if m['reason'] else ''}, {m['size']} bytes, dated {m['date']}, "
                      f"first seen {m['first_seen_at']}", highlight=False, markup=False, soft_wrap=True)
        for s in m["sightings"]:
            console.print(f"  seen in {s['account']} {s['folder']} uid {s['uid']} (uidvalidity {s['uidvalidity']}): "
                          f"{s['state']}{' (' + s['reason'] + ')' if s['reason'] else ''} at {s['seen_at']}",
                          highlight=False, markup=False, soft_wrap=True)
        for d in m["deliveries"]:
            console.print(f"  reached vault {d['vault']} (tenant {d['tenant']}) at {d['delivered_at']}, "
                          f"upload {d['upload_id']}", highlight=False, markup=False, soft_wrap=True)
        if not m["deliveries"]:
            console.print("  reached no vault", highlight=False)
