"""`imapsync ledger check`: is the ledger consistent with itself?

Why: the archive's promises rest on the ledger. After a crash, a full disk or a bug,
an administrator (and the crash-loop tests) must be able to ask whether it still
tells the truth: no row pointing at nothing, no cursor past a copy that is not
final (design rule 3), nothing archived without a vault it reached (rule 2), nothing
skipped or failed without its reason. The queries live in the ledger (the only user
of SQLAlchemy); this module says what each finding means, in one line per problem.

What is NOT a problem: a run without an end (a crashed or killed pass), a pending
copy above its folder's cursor (redone by the next pass), a message uploaded by
`imapsync upload` with no copy in any folder, copies under an old UIDVALIDITY.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from imapsync.ledger import Ledger, State

#: Problem lines shown per check; the count is always complete.
SHOWN_PER_CHECK = 20
_NOT_FINAL = [s.value for s in State if not s.final]
_NEED_REASON = [State.SKIPPED.value, State.FAILED.value]


@dataclass(frozen=True)
class Problem:
    """One inconsistency: which check found it, where, and what is wrong."""

    check: str  # a fixed word: dangling_reference, orphan_message, cursor_past_unfinished, ...
    where: str
    detail: str

    def line(self) -> str:
        return f"{self.check}: {self.where}: {self.detail}"


@dataclass
class CheckResult:
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # check -> rows found (complete)
    totals: dict[str, int] = field(default_factory=dict)  # table -> rows checked

    @property
    def ok(self) -> bool:
        return not self.counts

    def lines(self) -> list[str]:
        out = [p.line() for p in self.problems]
        for check, n in sorted(self.counts.items()):
            shown = sum(1 for p in self.problems if p.check == check)
            if n > shown:
                out.append(f"{check}: … and {n - shown} more")
        return out

    def summary(self) -> str:
        t = self.totals
        checked = ", ".join(f"{t.get(k, 0)} {word}" for k, word in (
            ("accounts", "accounts"), ("folders", "folders"), ("messages", "messages"),
            ("sightings", "copies"), ("deliveries", "deliveries")))
        if self.ok:
            return f"ledger consistent: {checked} checked"
        return f"ledger inconsistent: {sum(self.counts.values())} problem(s) in {checked}"

    def _add(self, check: str, n: int, problems: list[Problem]) -> None:
        if n:
            self.counts[check] = self.counts.get(check, 0) + n
            self.problems += problems


def _copy(row: dict) -> str:
    return f"{row['account']}/{row['folder']} uidvalidity {row['uidvalidity']} uid {row['uid']}"


def check(ledger: Ledger, shown: int = SHOWN_PER_CHECK) -> CheckResult:
    """Run every check; read only."""
    result = CheckResult(totals=ledger.table_sizes())
    for column, target, n, rows in ledger.dangling_references(shown):
        result._add("dangling_reference", n, [
            Problem("dangling_reference", f"{column.split('.')[0]} {_keys(r, column)}",
                    f"{column} = {r[column.split('.')[1]]} but no such row in {target}") for r in rows])

    n, rows = ledger.messages_without_copy_or_delivery(shown)
    result._add("orphan_message", n, [
        Problem("orphan_message", f"message {r['id']} ({r['message_id'] or r['key']})",
                f"state {r['state']}, but no copy in any folder and no vault reached") for r in rows])

    n, rows = ledger.copies_at_or_below_cursor(_NOT_FINAL, shown)
    result._add("cursor_past_unfinished", n, [
        Problem("cursor_past_unfinished", _copy(r),
                f"copy is {r['state']} but the folder's cursor is at uid {r['last_uid']}: "
                "the next pass would never redo it") for r in rows])

    n, rows = ledger.archived_copies_without_delivery(shown)
    result._add("archived_without_delivery", n, [
        Problem("archived_without_delivery", _copy(r),
                f"copy is {r['state']} but its message "
                f"{'is unknown' if r['message_ref'] is None else str(r['message_ref']) + ' reached no vault'}")
        for r in rows])

    n, rows = ledger.uploaded_messages_without_delivery(shown)
    result._add("uploaded_without_delivery", n, [
        Problem("uploaded_without_delivery", f"message {r['id']} ({r['message_id'] or r['key']})",
                "marked uploaded but no vault is recorded as reached") for r in rows])

    n, rows = ledger.copies_without_reason(_NEED_REASON, shown)
    result._add("no_reason", n, [
        Problem("no_reason", _copy(r), f"copy is {r['state']} without a reason") for r in rows])

    for table, n, rows in ledger.unknown_states([s.value for s in State], shown):
        result._add("unknown_state", n, [
            Problem("unknown_state", f"{table} {r['id']}", f"state {r['state']!r} is not one of the ledger's states")
            for r in rows])
    return result


def _keys(row: dict, column: str) -> str:
    name = column.split(".")[1]
    return " ".join(f"{k}={v}" for k, v in row.items() if k != name) or f"{name}={row[name]}"
