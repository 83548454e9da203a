"""What Envoy should run: the rendered bootstrap and the content hash of every file Envoy reads itself."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class DesiredState:
    """The rendered bootstrap and the (path, sha256) of every file it depends on. Two states with the same digest
    run the same Envoy: a new epoch starts only when the digest changes."""

    bootstrap: bytes
    dependencies: tuple[tuple[str, str], ...] = ()

    @property
    def digest(self) -> str:
        h = hashlib.sha256(self.bootstrap)
        for path, content_hash in self.dependencies:
            h.update(f"\0{path}\0{content_hash}".encode())
        return h.hexdigest()


# Re-reads and re-renders every source. May raise anything (a ConfigError for bad input; an OSError for a full
# disk): the supervisor rejects the new configuration and the running Envoy keeps serving.
DesiredStateFn = Callable[[], DesiredState]
