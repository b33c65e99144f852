"""Helpers shared by the command-line entry points."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from .pod import sha256_file  # noqa: F401 (re-exported: pod.py, standalone in the image, owns it)

ROOT = Path(__file__).resolve().parent.parent


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status 1, no traceback."""


def run_cli(prog: str, main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    try:
        return int(main(argv) or 0)
    except CLIError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def git_commit(repo: Path = ROOT) -> str:
    """HEAD's sha, with "-dirty" when tracked files differ; "unknown" outside a git checkout."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")
