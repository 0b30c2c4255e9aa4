"""The commit that results are stamped with: :func:`git_commit` (``ssam_bench.common`` stamps
every results file with it). Torch-free, so ``benchmarks/gpu_check.sh`` prints the stamp at the
start of each part in a moment, before the build: ``python3 benchmarks/stamp.py``."""

from __future__ import annotations

import os
import subprocess

_HERE = os.path.dirname(os.path.abspath(__file__))


def git_commit(root: str = os.path.dirname(_HERE)) -> str:
    """HEAD's short hash of the project's own repository at ``root`` (the checkout holding
    these benchmarks), "-dirty" when tracked code differs from it (results files do not count:
    a run that writes several of them would otherwise mark its own later ones). "unknown"
    where ``root`` is not the top of a git work tree: a copy without ``.git`` inside some other
    repository must not stamp that repository's commit. ``SSAM_COMMIT`` names it where the
    copy has no ``.git`` at all (a GPU machine given the working tree: set it when starting
    the run there, to what this prints in the checkout the copy comes from, ``-dirty``
    included: the copy carries the uncommitted changes)."""
    given = os.environ.get("SSAM_COMMIT", "").strip()
    if given:
        return given
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root, check=True).stdout.strip()

    try:
        if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(root):
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)benchmarks/results")
        return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    print(git_commit())
