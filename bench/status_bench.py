"""How fast are the status queries on a ledger of a million rows? Prints one table.

Fills a fresh SQLite ledger (schema from the migrations, as `imapsync` creates it)
with bulk inserts: ROWS sightings over 100 accounts x 10 folders, one message per
sighting but a few duplicates, one delivery per uploaded message over two tenants,
5 % of the copies failed or skipped, and 20,000 runs. Then times each query the CLI
runs for `status`, `status --failed`, `--runs`, `--message`, the per-tenant lines,
and the per-window lookups of `backfill` and `verify`, best of REPEAT.

    .venv/bin/python bench/status_bench.py [--rows 1000000] [--repeat 3] [--keep PATH]

Each query is timed twice on the same ledger and under the same load: with the indexes
of migration 0003 and with them dropped for the moment (then made again), so the table
shows what the migration buys.
"""
from __future__ import annotations

import argparse
import random
import sqlite3
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

from imapsync import status as st
from imapsync.ledger import Ledger, State

ACCOUNTS, FOLDERS, TENANTS = 100, 10, ("acme.com", "acme.org")
#: The indexes migration 0003 adds for these queries.
INDEXES_0003 = ("ix_sightings_folder_uv_state", "ix_deliveries_tenant", "ix_runs_started")


def fill(path: Path, rows: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    Ledger.open(f"sqlite:///{path}").close()  # the schema, through the migrations
    c = sqlite3.connect(path)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=OFF")
    t0 = datetime(2020, 1, 1)
    c.executemany("INSERT INTO accounts (id, name, host, username, failures) VALUES (?, ?, ?, ?, 0)",
                  [(a, f"user{a}", "imap.acme.com", f"user{a}@acme.com") for a in range(1, ACCOUNTS + 1)])
    per_folder = rows // (ACCOUNTS * FOLDERS)
    folders = [(f, (f - 1) // FOLDERS + 1, f"Folder{(f - 1) % FOLDERS}", 1000 + f, per_folder, per_folder + 1)
               for f in range(1, ACCOUNTS * FOLDERS + 1)]
    c.executemany("INSERT INTO folders (id, account_id, name, uidvalidity, last_uid, uidnext) VALUES (?,?,?,?,?,?)",
                  folders)
    messages, sightings, deliveries = [], [], []
    mid = 0
    for fid, aid, _name, uv, n, _next in folders:
        for uid in range(1, n + 1):
            r = rng.random()
            state = (State.FAILED if r < 0.025 else State.SKIPPED if r < 0.05
                     else State.DUPLICATE if r < 0.08 and mid else State.UPLOADED)
            when = t0 + timedelta(seconds=mid * 7)
            if state is State.DUPLICATE:
                ref = rng.randint(1, mid)
            else:
                mid += 1
                ref = mid
                reason = ("s3_upload_failed" if state is State.FAILED else
                          "no_primary_recipient" if state is State.SKIPPED else None)
                messages.append((ref, f"m:{ref:040x}:{ref % 4096:012x}", f"<msg-{ref}@mailer.example>",
                                 rng.randint(2_000, 200_000), when.strftime("%a, %d %b %Y %H:%M:%S +0000"),
                                 state.value, reason, 1 if state is not State.FAILED else 5,
                                 "HTTP 503" if state is State.FAILED else None, when,
                                 when if state is State.UPLOADED else None))
                if state is State.UPLOADED:
                    deliveries.append((ref, f"user{aid}@acme.com", TENANTS[ref % 2], f"up-{ref}", when))
            sightings.append((fid, uv, uid, ref, f"<msg-{ref}@mailer.example>", 10_000, state.value,
                              None if state in (State.UPLOADED, State.DUPLICATE) else "s3_upload_failed"
                              if state is State.FAILED else "no_primary_recipient", when))
    c.executemany("INSERT INTO messages (id, key, message_id, size, date, state, reason, attempts, last_error, "
                  "first_seen_at, uploaded_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)", messages)
    c.executemany("INSERT INTO sightings (folder_id, uidvalidity, uid, message_ref, message_id, size, state, reason, "
                  "seen_at) VALUES (?,?,?,?,?,?,?,?,?)", sightings)
    c.executemany("INSERT INTO deliveries (message_ref, vault, tenant, upload_id, delivered_at) VALUES (?,?,?,?,?)",
                  deliveries)
    c.executemany("INSERT INTO runs (kind, account, started_at, ended_at, outcome, uploaded) VALUES (?,?,?,?,?,?)",
                  [("sync" if i % 10 else "backfill", f"user{i % ACCOUNTS + 1}", t0 + timedelta(minutes=i),
                    t0 + timedelta(minutes=i, seconds=30), "ok", i % 50) for i in range(20_000)])
    c.commit()
    c.execute("ANALYZE")
    c.close()


def timed(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="keep the filled ledger at this path (reused if it exists)")
    args = ap.parse_args()
    path = args.keep or Path(tempfile.mkdtemp(prefix="imapsync-bench-")) / "ledger.sqlite3"
    if not path.exists():
        t = time.perf_counter()
        fill(path, args.rows)
        print(f"filled {path} with {args.rows:,} sightings in {time.perf_counter() - t:.1f}s")
    ledger = Ledger.open(f"sqlite:///{path}")
    with sqlite3.connect(path) as c:
        counts = {t: c.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                  for t in ("sightings", "messages", "deliveries", "runs")}
        revision = c.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    print("rows: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + f"; schema revision {revision}")
    uids = list(range(1, 501))
    queries = [
        ("status (all accounts: cursors, counts, not archived, tenants)", lambda: st.report(ledger)),
        ("  of which: cursors and counts per folder", lambda: ledger.status()),
        ("  of which: not archived (first 1000)", lambda: ledger.problems()),
        ("status --account user42", lambda: st.report(ledger, "user42")),
        ("  of which: cursors and counts per folder", lambda: ledger.status("user42")),
        ("status --failed (first 1000, and the total)", lambda: st.failed(ledger)),
        ("status --failed --account user42", lambda: st.failed(ledger, "user42")),
        ("status --failed --reason s3_upload_failed", lambda: st.failed(ledger, reason="s3_upload_failed")),
        ("status --runs (newest 50)", lambda: st.runs(ledger)),
        ("status --runs --account user42", lambda: st.runs(ledger, "user42")),
        ("status --message <msg-123456@mailer.example>", lambda: st.message(ledger, "<msg-123456@mailer.example>")),
        ("  tenant summary lines (in both of the above)", lambda: st.tenants(ledger)),
        ("backfill window: final_before(500 uids)", lambda: ledger.final_before(500, 1500, uids, datetime(2030, 1, 1))),
        ("verify batch: copies(500 uids)", lambda: ledger.copies(500, 1500, uids)),
    ]
    with_indexes = [(name, *timed(fn, args.repeat)) for name, fn in queries]
    with sqlite3.connect(path) as c:
        made = [sql for (sql,) in c.execute("SELECT sql FROM sqlite_master WHERE type = 'index' AND name IN "
                                            f"({','.join('?' * len(INDEXES_0003))})", INDEXES_0003)]
        for name in INDEXES_0003:
            c.execute(f"DROP INDEX {name}")
    try:
        without = [timed(fn, args.repeat)[0] for _name, fn in queries]
    finally:
        with sqlite3.connect(path) as c:
            for sql in made:
                c.execute(sql)
    print(f"\n{'query (best of ' + str(args.repeat) + ')':<62} {'0003 indexes':>13} {'without':>11}  result")
    print("-" * 104)
    for (name, secs, out), before in zip(with_indexes, without):
        size = (len(out) if isinstance(out, (list, dict, set)) else "")
        if isinstance(out, dict) and "failed" in out:
            size = f"{len(out['failed'])} of {out['total']}"
        print(f"{name:<62} {secs * 1000:>10.1f} ms {before * 1000:>8.1f} ms  {size}")
    ledger.close()


if __name__ == "__main__":
    main()
