"""Helpers for the tests that tamper with an exported bundle (test_trust, test_graphcheck); the
exported bundle itself is the session fixture ``bundle`` in conftest.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def rehash(b: Path) -> None:
    """An attacker controls the manifest too: make its hashes match the tampered files."""
    man = json.loads((b / "manifest.json").read_text())
    for name, info in man["files"].items():
        if (b / name).is_file():
            info["sha256"] = hashlib.sha256((b / name).read_bytes()).hexdigest()
    (b / "manifest.json").write_text(json.dumps(man))
