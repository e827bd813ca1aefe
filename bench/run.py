"""The benchmark: imapsync against the tools an administrator would otherwise use.

One command (`make bench`, or `.venv/bin/python bench/run.py`) starts Dovecot on
loopback, seeds the corpus (bench/corpus.py) straight into Maildir, starts the local
receiver, and runs each contender as a whole process, timed, with its peak RSS, the
median of --runs runs (--ratio-runs for the directory sink and the receiver at 0 ms,
which take turns, since their ratio is a target):

  imapsync -> receiver (0 ms)     imapsync backfill into the local receiver, no latency
  imapsync -> directory           imapsync backfill into the directory sink
  imapsync -> receiver (200 ms)   the same with 200 ms per request (concurrency matters)
  mbsync (isync)                  IMAP -> Maildir
  getmail6                        IMAP -> Maildir
  imapclient loop                 one connection, BODY.PEEK[] in batches of 200 (the Python floor)
  no-change poll                  imapsync sync over --poll-accounts accounts x 10 folders, nothing new
  directory at --rss-at messages  one more backfill of a larger corpus: is peak RSS flat? (optional)

Dovecot runs in its documented high-performance mode (login and imap processes reused),
as servers with many users do: with its default, a new imap process per login, the
no-change poll of 100 accounts costs about 0.7 s more on a 2-core machine, spent in the
server.

Every imapsync run starts from an empty ledger and an empty sink, so each one is a
full backfill of the corpus (the same planning, dedup and upload path as continuous
sync), and after a sync(2): what the run before wrote is on disk before the clock starts.
The receiver keeps what it receives in memory (/dev/shm) when the corpus fits: it stands
in for a service whose disks are elsewhere, yet it shares the cores with imapsync. It
prints one table, the ratios against the targets of issue 6, and writes them with the
machine's details to bench/results/. Profile a contender with py-spy, e.g.
`py-spy record --gil -o profile.svg -- .venv/bin/imapsync backfill --config ...`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from corpus import FOLDERS, seed  # noqa: E402

from imapsync.receiver import Receiver  # noqa: E402
from imapsync.testing.dovecot import Dovecot  # noqa: E402

USER, PASSWORD, DOMAIN = "bench@acme.com", "bench-password", "acme.com"

#: Where the local receiver keeps what it receives, when it has room: memory (tmpfs).
IN_MEMORY = Path("/dev/shm")


def stand_in_store(work: Path, nbytes: int) -> Path:
    """The receiver stands in for a service whose storage is on other machines, yet it
    runs on the same cores as imapsync. On ext4 its file creation was a third of its CPU
    per upload (1.4 against 0.95 ms), so it stores in memory when the corpus fits twice
    over; otherwise beside the run, on disk."""
    if IN_MEMORY.is_dir() and os.access(IN_MEMORY, os.W_OK) and shutil.disk_usage(IN_MEMORY).free > 2 * nbytes:
        return Path(tempfile.mkdtemp(prefix="imapsync-bench-received-", dir=IN_MEMORY))
    return work / "received"


@dataclass
class Row:
    tool: str
    seconds: float
    msgs_per_s: float
    mb_per_s: float
    rss_mb: float
    runs: int
    note: str = ""
    times: list[float] = field(default_factory=list)  # each run's wall seconds, in order
    cpu_ms: float = 0.0  # the contender's own CPU (user + system) per message, median of the runs
    receiver_cpu_ms: float = 0.0  # the local receiver's CPU per message (it runs in this process)
    steal: float = 0.0  # the largest share of the CPUs the hypervisor gave to others during a run
    whole: bool = True  # some run delivered the whole corpus (else the row is from partial runs)


GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def cpu_ticks() -> tuple[int, int]:
    """(all, stolen) CPU ticks of the machine so far, from /proc/stat (0, 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0


def timed(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> tuple[float, float, float, int]:
    """Run a whole process; (wall seconds, peak RSS in MB, CPU seconds, exit code).

    The CPU is the process's and its children's, user and system, as the kernel counts it.
    The peak RSS comes from GNU time when installed: a child forked from this (large)
    Python process would otherwise report this process's size as its own peak.
    """
    with tempfile.NamedTemporaryFile("r") as rss_file:
        wrapped = [GNU_TIME, "-q", "-f", "%M", "-o", rss_file.name, *cmd] if GNU_TIME else cmd
        t0 = time.perf_counter()
        proc = subprocess.Popen(wrapped, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - t0
        measured = rss_file.read().strip().splitlines()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(f"  ! {cmd[0]} exited {code}: {err.strip()[-500:]}", file=sys.stderr)
    rss_kb = int(measured[-1]) if measured and measured[-1].isdigit() else usage.ru_maxrss
    return elapsed, rss_kb / 1024, usage.ru_utime + usage.ru_stime, code


@dataclass
class Contender:
    name: str
    prepare: Callable[[int], Path]  # run index -> a fresh work directory
    cmd_for: Callable[[Path], tuple[list[str], dict]]
    finish: Callable[[], None] = lambda: None  # after each run (e.g. stop the receiver it started)
    delivered: Callable[[Path], int] | None = None  # messages the run left in its work directory
    serves: bool = False  # this process serves it (the local receiver): count this process's CPU


def maildir_messages(work: Path) -> int:
    """Messages a Maildir peer delivered: files in every cur/ and new/ under work/mail."""
    return sum(1 for sub in ("cur", "new") for d in (work / "mail").rglob(sub) if d.is_dir()
               for _ in d.iterdir())


def median_run(name: str, runs: int, prepare, cmd_for, copies: int, nbytes: int,
               delivered: Callable[[Path], int] | None = None) -> Row:
    return interleaved([Contender(name, prepare, cmd_for, delivered=delivered)], runs, copies, nbytes)[0]


@dataclass
class Run:
    """One timed run of a contender."""

    seconds: float
    rss_mb: float
    cpu: float  # the contender's CPU seconds
    beside: float  # this process's CPU seconds meanwhile, for a contender it serves: the receiver's
    steal: float  # the share of the machine's CPU the host took meanwhile
    delivered: int


def interleaved(contenders: list[Contender], runs: int, copies: int, nbytes: int) -> list[Row]:
    """Run 1 of each contender, then run 2 of each, and so on; a row each (median of its runs).

    Contenders whose ratio is a target run in turn rather than one after the other, so
    that a machine that gets slower or faster during the bench (a VM's neighbours) moves
    both sides of the ratio alike: run i of one is compared with run i of the other.
    A contender that can say what it delivered is rated on that, not on the corpus: a
    peer that stops half-way is not credited with the other half. Its runs that delivered
    the whole corpus make its row when there are any (the others are named in the note):
    getmail6 sometimes ends early on a race of its own, after a stall, and such a run
    measures the stall more than the tool.
    """
    done: dict[str, list[Run]] = {c.name: [] for c in contenders}
    notes: dict[str, list[str]] = {c.name: [] for c in contenders}
    for i in range(runs):
        for c in contenders:
            work = c.prepare(i)
            cmd, env = c.cmd_for(work)
            os.sync()  # what the run before wrote (2.3 GB for a sink) is written back now, not during this run
            before, ticks = os.times(), cpu_ticks()
            try:
                t, r, used, code = timed(cmd, env)
                after, (total, stolen) = os.times(), [b - a for a, b in zip(ticks, cpu_ticks())]
            finally:  # even on Ctrl-C: a receiver's store in memory must not outlive the bench
                c.finish()
            run = Run(t, r, used, after.user - before.user + after.system - before.system if c.serves else 0.0,
                      stolen / total if total else 0.0, c.delivered(work) if c.delivered else copies)
            done[c.name].append(run)
            short = f", delivered {run.delivered:,} of {copies:,}" if run.delivered != copies else ""
            if code != 0 or short:
                notes[c.name].append(f"run {i + 1}" + (f" exit {code}" if code else "") + short)
            print(f"  {c.name} run {i + 1}: {t:.2f}s, {run.delivered / t:.0f} msgs/s, RSS {r:.0f} MB, "
                  f"steal {run.steal:.0%}{short}", flush=True)
    rows = []
    for c in contenders:
        every = done[c.name]
        complete = [run for run in every if run.delivered == copies]
        whole = complete or every  # see the docstring
        if not complete:
            notes[c.name].append("no run delivered the whole corpus: each is rated on what it delivered, "
                                 "its stall included")
        elif len(complete) < len(every):
            notes[c.name].append(f"the row is from the {len(complete)} whole run(s)")
        rate = statistics.median(run.delivered / run.seconds for run in whole)
        rows.append(Row(c.name, round(statistics.median(run.seconds for run in whole), 2), round(rate, 1),
                        round(nbytes / copies * rate / 1e6, 1), round(max(run.rss_mb for run in every), 1), runs,
                        "; ".join(notes[c.name]), [round(run.seconds, 3) for run in every],
                        round(statistics.median(run.cpu / max(1, run.delivered) for run in whole) * 1e3, 2),
                        round(statistics.median(run.beside / max(1, run.delivered) for run in whole) * 1e3, 2),
                        round(max(run.steal for run in every), 3), bool(complete)))
    return rows


def paired_ratio(row: Row, base: Row) -> tuple[float, list[float]]:
    """Throughput of `row` over `base`, run i against run i (interleaved runs): (median, each)."""
    each = [b / a for a, b in zip(row.times, base.times)]
    return statistics.median(each), each


def imapsync_cmd(work: Path, config: dict, verb: str = "backfill") -> tuple[list[str], dict]:
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return ([sys.executable, "-m", "imapsync", "--log-level", "warning", verb, "--config", str(path)],
            dict(os.environ, BENCH_PW=PASSWORD, BENCH_KEY="bench-key"))


def account(port: int, name: str = "bench", user: str = USER) -> dict:
    return {"name": name, "host": "127.0.0.1", "port": port, "tls": "plain", "username": user,
            "password": {"env": "BENCH_PW"}}


def mbsync_cmd(port: int, work: Path) -> tuple[list[str], dict]:
    (work / "mail").mkdir()
    rc = work / "mbsyncrc"
    rc.write_text(f"""IMAPAccount bench
Host 127.0.0.1
Port {port}
User {USER}
Pass {PASSWORD}
SSLType None
AuthMechs LOGIN

IMAPStore remote
Account bench

MaildirStore local
Path {work}/mail/
Inbox {work}/mail/INBOX
SubFolders Verbatim

Channel bench
Far :remote:
Near :local:
Patterns *
Create Near
Sync Pull
SyncState *
""")
    return ["mbsync", "-q", "-c", str(rc), "-a"], dict(os.environ)


def getmail_cmd(port: int, work: Path) -> tuple[list[str], dict]:
    mail = work / "mail"
    for sub in ("cur", "new", "tmp"):
        (mail / sub).mkdir(parents=True, exist_ok=True)
    prefix: list[str] = []
    if os.geteuid() == 0:  # getmail refuses to deliver as root: run it as nobody (not a child per message)
        import pwd
        nobody = pwd.getpwnam("nobody")
        for p in [work, mail, *mail.iterdir()]:
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
        prefix = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
    rc = work / "getmailrc"
    rc.write_text(f"""[retriever]
type = SimpleIMAPRetriever
server = 127.0.0.1
port = {port}
username = {USER}
password = {PASSWORD}
mailboxes = ALL
# getmail waits for each delivery's child process on a condition that its SIGCHLD handler
# can signal before the wait begins; that lost wake-up ends the run with "waiting child pid
# timed out" after this many seconds (180 by default). Loopback IMAP needs far less.
timeout = 10

[destination]
type = Maildir
path = {mail}/

[options]
read_all = true
delete = false
verbose = 0
""")
    owner = os.stat(work)
    os.chown(rc, owner.st_uid, owner.st_gid)  # nobody's, when run as root
    return [*prefix, "getmail", "--rcfile", str(rc), "--getmaildir", str(work)], dict(os.environ, HOME=str(work))


def machine() -> dict:
    mem = next((line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal")), "?")
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "mem_kb": mem, "load": os.getloadavg(),
            "dovecot": subprocess.run(["dovecot", "--version"], capture_output=True, text=True).stdout.strip()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ratio-runs", type=int, default=5, metavar="N",
                    help="interleaved runs of the directory sink and the receiver at 0 ms (their ratio is a target)")
    ap.add_argument("--poll-accounts", type=int, default=100)
    ap.add_argument("--only", nargs="*", default=None,
                    help="subset: receiver directory latency mbsync getmail floor poll")
    ap.add_argument("--rss-at", type=int, default=0, metavar="N",
                    help="also back up a corpus of N messages into the directory sink once (peak RSS flat?)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    want = set(args.only or ["receiver", "directory", "latency", "mbsync", "getmail", "floor", "poll"])
    missing = [t for t, k in (("mbsync", "mbsync"), ("getmail", "getmail")) if k in want and not shutil.which(t)]
    if missing or not Dovecot.available():
        print(f"bench: missing {', '.join(missing + ([] if Dovecot.available() else ['dovecot']))}: "
              "apt-get install isync getmail6 dovecot-imapd", file=sys.stderr)
        return 2
    rows: list[Row] = []
    poll_seconds: float | None = None
    scratch = Path(tempfile.mkdtemp(prefix="imapsync-bench-"))
    scratch.chmod(0o755)  # getmail delivers as nobody when run as root: it must reach its Maildir
    with Dovecot(performance=True) as dovecot:  # Dovecot's high-performance mode, as busy servers run
        dovecot.add_user(USER, PASSWORD)
        t0 = time.perf_counter()
        corpus = seed(dovecot, USER, args.messages)
        print(f"corpus: {corpus.messages} messages ({corpus.copies} copies over {len(FOLDERS)} folders), "
              f"{corpus.bytes / 1e6:.0f} MB, seeded in {time.perf_counter() - t0:.1f}s", flush=True)
        n, nbytes = corpus.copies, corpus.bytes

        def fresh(i: int, name: str) -> Path:
            work = scratch / f"{name}-{i}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            return work

        def base_config(work: Path) -> dict:
            return {"ledger": str(work / "ledger.sqlite3"), "accounts": [account(dovecot.port)]}

        peak_in_flight: dict[str, int] = {}

        def directory() -> Contender:
            return Contender("imapsync -> directory", lambda i: fresh(i, "dir"), lambda w: imapsync_cmd(
                w, dict(base_config(w), sink="directory", directory=str(w / "out"), tenants=[{"domain": DOMAIN}])))

        def receiver(latency: int) -> Contender:
            """A fresh receiver for each run (it remembers request ids), stopped after it."""
            name = f"imapsync -> receiver ({latency} ms)"
            running: list[Receiver] = []

            def prepare(i: int) -> Path:
                work = fresh(i, f"receiver{latency}")
                running.append(Receiver(stand_in_store(work, nbytes), api_key="bench-key",
                                        latency_ms=latency).start())
                return work

            def cmd(w: Path) -> tuple[list[str], dict]:
                return imapsync_cmd(w, dict(base_config(w), tenants=[{
                    "domain": DOMAIN, "endpoint": running[-1].url, "api_key": {"env": "BENCH_KEY"}}],
                    upload={"max_attempts": 3, "backoff_factor": 0.1}))

            def finish() -> None:
                rx = running.pop()
                rx.stop()
                shutil.rmtree(rx.store, ignore_errors=True)  # it may be in memory: free it now
                peak_in_flight[name] = max(peak_in_flight.get(name, 0), rx.stats["peak_in_flight"])

            return Contender(name, prepare, cmd, finish, serves=True)

        # The directory sink and the receiver at 0 ms take turns: their ratio is a target.
        pair = [make for make, key in ((directory, "directory"), (lambda: receiver(0), "receiver")) if key in want]
        if pair:
            rows.extend(interleaved([make() for make in pair], args.ratio_runs if len(pair) == 2 else args.runs,
                                    n, nbytes))
        if "latency" in want:
            rows.extend(interleaved([receiver(200)], args.runs, n, nbytes))
        for row in rows:
            if row.tool in peak_in_flight:  # beside what the runs said (an exit code, say)
                row.note = "; ".join(filter(None, [f"peak uploads in flight {peak_in_flight[row.tool]}", row.note]))
        if "mbsync" in want:
            rows.append(median_run("mbsync (isync)", args.runs, lambda i: fresh(i, "mbsync"),
                                   lambda w: mbsync_cmd(dovecot.port, w), n, nbytes, maildir_messages))
        if "getmail" in want:
            rows.append(median_run("getmail6", args.runs, lambda i: fresh(i, "getmail"),
                                   lambda w: getmail_cmd(dovecot.port, w), n, nbytes, maildir_messages))
        if "floor" in want:
            rows.append(median_run("imapclient loop", args.runs, lambda i: fresh(i, "floor"), lambda w: (
                [sys.executable, str(HERE / "floor_imapclient.py"), "127.0.0.1", str(dovecot.port), USER, PASSWORD,
                 str(w / "out")], dict(os.environ)), n, nbytes))
        if "poll" in want:
            poll_seconds = no_change_poll(dovecot, scratch, args.poll_accounts, args.runs)
        if args.rss_at:
            user = f"large@{DOMAIN}"
            dovecot.add_user(user, PASSWORD)
            big = seed(dovecot, user, args.rss_at, seed=7)
            print(f"corpus for --rss-at: {big.copies} copies, {big.bytes / 1e6:.0f} MB", flush=True)
            rows.append(median_run(f"imapsync -> directory ({big.messages:,} msgs)", 1,
                                   lambda i: fresh(i, "large"), lambda w: imapsync_cmd(
                w, {"ledger": str(w / "ledger.sqlite3"), "accounts": [account(dovecot.port, "large", user)],
                    "sink": "directory", "directory": str(w / "out"), "tenants": [{"domain": DOMAIN}]}),
                big.copies, big.bytes))
    shutil.rmtree(scratch, ignore_errors=True)
    report(rows, poll_seconds, args, corpus)
    return 0


def no_change_poll(dovecot: Dovecot, scratch: Path, accounts: int, runs: int) -> float:
    """`imapsync sync` over accounts x 10 folders in which nothing changed: wall seconds (median)."""
    work = scratch / "poll"
    work.mkdir()
    cfg_accounts = []
    for a in range(accounts):
        user = f"poll{a}@{DOMAIN}"
        dovecot.add_user(user, PASSWORD)
        for f in range(10):
            dovecot.deliver(user, f"From: x@partner.example\r\nTo: {user}\r\nSubject: poll {a}.{f}\r\n"
                                  f"Message-ID: <poll-{a}-{f}@partner.example>\r\n\r\nbody\r\n".encode(),
                            "INBOX" if f == 0 else f"Folder{f}")
        cfg_accounts.append(account(dovecot.port, f"poll{a}", user))
    cmd, env = imapsync_cmd(work, {"ledger": str(work / "ledger.sqlite3"), "sink": "directory",
                                   "directory": str(work / "out"), "tenants": [{"domain": DOMAIN}],
                                   "accounts": cfg_accounts}, verb="sync")
    timed(cmd, env)  # the first pass archives; the timed ones find nothing new
    times = []
    for i in range(runs):
        t, r, _, _ = timed(cmd, env)
        times.append(t)
        print(f"  no-change poll run {i + 1}: {t:.2f}s (RSS {r:.0f} MB)", flush=True)
    return round(statistics.median(times), 2)


def report(rows: list[Row], poll: float | None, args, corpus) -> None:
    by = {r.tool: r for r in rows}
    lines = [f"{'tool':32} {'msgs/s':>9} {'MB/s':>8} {'peak RSS MB':>12} {'seconds':>9} {'CPU ms/msg':>11}  note",
             "-" * 101]
    for r in rows:
        note = "; ".join(filter(None, [
            r.note, f"receiver CPU {r.receiver_cpu_ms:.2f} ms/msg" if r.receiver_cpu_ms >= 0.01 else "",
            f"up to {r.steal:.0%} of the CPUs stolen by the host" if r.steal >= 0.02 else ""]))
        lines.append(f"{r.tool:32} {r.msgs_per_s:>9.1f} {r.mb_per_s:>8.1f} {r.rss_mb:>12.0f} {r.seconds:>9.2f} "
                     f"{r.cpu_ms:>11.2f}  {note}")
    if poll is not None:
        lines.append(f"{'no-change poll (' + str(args.poll_accounts) + ' x 10 folders)':32} {'':>9} {'':>8} {'':>12} "
                     f"{poll:>9.2f}")
    ours = by.get("imapsync -> directory")
    ratios = []

    def check(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    for peer, want in (("mbsync (isync)", 1.0), ("getmail6", 10.0), ("imapclient loop", 1.0)):
        if ours and peer in by:
            ratio = ours.msgs_per_s / by[peer].msgs_per_s
            goal = "aim" if peer.startswith("mbsync") else "target"
            partial = "" if by[peer].whole else f", against {peer} runs that stopped early (see its row)"
            ratios.append(f"directory sink / {peer}: {ratio:.2f}x ({goal} >= {want:g}x: {check(ratio >= want)}){partial}")
    recv0 = by.get("imapsync -> receiver (0 ms)")
    if ours and recv0:
        ratio, each = paired_ratio(recv0, ours)
        ratios.append(f"receiver (0 ms) / directory sink: {ratio:.2f}x, the median of {len(each)} interleaved pairs "
                      f"({', '.join(f'{r:.2f}' for r in each)}; ratio of the medians "
                      f"{recv0.msgs_per_s / ours.msgs_per_s:.2f}x) (target >= 0.8x: {check(ratio >= 0.8)})")
        ratios.append(f"  imapsync's own CPU per message: {recv0.cpu_ms:.2f} ms into the receiver, {ours.cpu_ms:.2f} ms "
                      f"into the directory sink ({recv0.cpu_ms / ours.cpu_ms:.2f}x); the local receiver, on the same "
                      f"{os.cpu_count()} cores, used another {recv0.receiver_cpu_ms:.2f} ms per message")
    lat = by.get("imapsync -> receiver (200 ms)")
    if lat:
        target = 0.8 * 16 / 0.2
        ratios.append(f"receiver (200 ms): {lat.msgs_per_s:.1f} msgs/s (target >= 0.8 x 16 / 0.2 s = {target:.0f}: "
                      f"{check(lat.msgs_per_s >= target)})")
    if poll is not None:
        ratios.append(f"no-change poll: {poll:.2f} s (target < 2 s: {check(poll < 2)})")
    imapsync_rows = [r for r in rows if r.tool.startswith("imapsync")]
    if imapsync_rows:
        peak = max(r.rss_mb for r in imapsync_rows)
        ratios.append(f"imapsync peak RSS: {peak:.0f} MB (target < 150 MB: {check(peak < 150)})")
        large = [r for r in imapsync_rows if r.tool.startswith("imapsync -> directory (")]
        if ours and large:
            ratios.append(f"peak RSS at {args.rss_at:,} / at {args.messages:,} messages: "
                          f"{large[0].rss_mb / ours.rss_mb:.2f}x (flat: {check(large[0].rss_mb / ours.rss_mb < 1.15)})")
    text = "\n".join(lines + [""] + ratios)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    (args.out / f"{stamp}.txt").write_text(text + "\n")
    (args.out / f"{stamp}.json").write_text(json.dumps({
        "machine": machine(), "corpus": asdict(corpus), "runs": args.runs,
        "rows": [asdict(r) for r in rows], "no_change_poll_seconds": poll}, indent=2) + "\n")
    print(f"\nresults: {args.out / (stamp + '.txt')}")


if __name__ == "__main__":
    raise SystemExit(main())
