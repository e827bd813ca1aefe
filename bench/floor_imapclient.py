"""The Python floor: one imapclient connection, BODY.PEEK[] in batches of 200, one file
per message. What a minimal hand-written archiver in Python achieves; run as a whole
process by bench/run.py.

usage: floor_imapclient.py HOST PORT USER PASSWORD OUTDIR
"""
from __future__ import annotations

import os
import sys

from imapclient import IMAPClient


def main(host: str, port: str, user: str, password: str, out: str) -> int:
    os.makedirs(out, exist_ok=True)
    n = 0
    with IMAPClient(host, port=int(port), ssl=False, timeout=120) as c:
        c.login(user, password)
        for _flags, _delim, folder in c.list_folders():
            c.select_folder(folder, readonly=True)
            uids = c.search("ALL")
            for i in range(0, len(uids), 200):
                for uid, data in c.fetch(uids[i:i + 200], ["BODY.PEEK[]"]).items():
                    with open(os.path.join(out, f"{n}.eml"), "wb") as f:
                        f.write(data[b"BODY[]"])
                    n += 1
    print(n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:6]))
