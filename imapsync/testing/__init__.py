"""Real servers for tests, the demo and the benchmark: Dovecot, pymap, PostgreSQL, proxies."""
from __future__ import annotations

from typing import Any


class Running:
    """`with Server(...) as s:` starts it and stops it, also when the body fails."""

    def start(self) -> Any:  # pragma: no cover - every server defines it
        raise NotImplementedError

    def stop(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
