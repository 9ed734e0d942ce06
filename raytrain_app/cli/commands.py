"""The commands this tool prints for users to copy (resume, fine-tune, continue a sweep's best trial)."""

from __future__ import annotations

import os
import shutil
import sys


def python_for_commands() -> str:
    """`python`, or the project's venv interpreter when it is not the one on PATH (right after `make demo`)."""
    on_path = shutil.which("python")
    if on_path and os.path.realpath(on_path) == os.path.realpath(sys.executable):
        return "python"
    relative = os.path.relpath(sys.executable)
    return relative if not relative.startswith("..") else sys.executable

