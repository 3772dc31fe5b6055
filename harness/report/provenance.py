"""Where a run came from: when it started (UTC), which commit of which tree, which CI run, runner and image.

Read from git and from the variables CI systems set; nothing here fails a run (an unknown fact is None).
Image facts come from variables the job sets itself, since a container cannot see its own image:
QWEN_COMPAT_IMAGE (the image reference with its tag) and QWEN_COMPAT_IMAGE_DIGEST (`sha256:...`).
"""

from __future__ import annotations

import os
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path

IMAGE_VARIABLE = "QWEN_COMPAT_IMAGE"
IMAGE_DIGEST_VARIABLE = "QWEN_COMPAT_IMAGE_DIGEST"
# The variable naming the machine that ran the job, per CI system (GitHub, GitLab, Jenkins, Buildkite).
RUNNER_VARIABLES = ("RUNNER_NAME", "CI_RUNNER_DESCRIPTION", "NODE_NAME", "BUILDKITE_AGENT_NAME")
# A variable holding the URL of the job itself (GitLab, Jenkins, Buildkite, CircleCI); GitHub's is built.
RUN_URL_VARIABLES = ("CI_JOB_URL", "BUILD_URL", "BUILDKITE_BUILD_URL", "CIRCLE_BUILD_URL")


def _git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def ci_run_url(env=os.environ) -> str | None:
    if env.get("GITHUB_RUN_ID") and env.get("GITHUB_REPOSITORY"):
        server = env.get("GITHUB_SERVER_URL", "https://github.com")
        url = f"{server}/{env['GITHUB_REPOSITORY']}/actions/runs/{env['GITHUB_RUN_ID']}"
        return url + (f"/attempts/{env['GITHUB_RUN_ATTEMPT']}" if env.get("GITHUB_RUN_ATTEMPT") else "")
    return next((env[name] for name in RUN_URL_VARIABLES if env.get(name)), None)


def runner_name(env=os.environ) -> str:
    """The CI runner's name (two runners on one host or two hosts of one card stay apart), else the host's."""
    return next((env[name] for name in RUNNER_VARIABLES if env.get(name)), None) or socket.gethostname()


def provenance(folder: Path | None = None, env=os.environ) -> dict:
    """The run's origin; `folder` is where the project under test is checked out (default: here)."""
    folder = Path(folder or ".")
    commit = _git(folder, "rev-parse", "HEAD")
    dirty = None
    if commit is not None:
        status = _git(folder, "status", "--porcelain", "--untracked-files=no")
        dirty = None if status is None else bool(status)
    elif env.get("GITHUB_SHA"):  # a checkout without git (an exported tree): what the CI says it built
        commit = env["GITHUB_SHA"]
    return {
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
        "ci_run_url": ci_run_url(env),
        "runner": runner_name(env),
        "image": env.get(IMAGE_VARIABLE) or None,
        "image_digest": env.get(IMAGE_DIGEST_VARIABLE) or None,
    }


def recorded_runner(environment: dict) -> str:
    """The runner a results file says it came from: its provenance, else the host (older files)."""
    return (environment.get("provenance") or {}).get("runner") or environment.get("host") or "unknown"
