"""A server the harness launches: start it, wait until it is ready, watch it, measure it, stop it.

One server per group, on 127.0.0.1 and a free port. Its stdout and stderr go to a log file that is
kept (the tail goes into every failure it causes). It runs in a session of its own, and stopping it
stops its process group and every process of its tree (a shell wrapper's children, vLLM's engine core,
tensor-parallel workers, one that made a session of its own); when the process that launched it dies,
however it dies, its reaper (harness/engines/reaper.py) does the same. Readiness is its own
route answering 200 within the start-up timeout; a server that exits or never becomes ready is one
`ServerStartError` carrying the log tail.

Memory on the CPU is the peak resident memory of the whole process tree, from the kernel's own
high-water mark of each process (VmHWM, reset per cell through /proc/PID/clear_refs): exact for a
one-process server such as `transformers serve`, an upper bound for a tree whose processes peak at
different moments. Engines that report their own memory (vLLM) have those lines read from the log
into named figures: an engine that preallocates a fraction of the card makes any device-level
"peak" mean that fraction, so budgets are best checked against the engine's own figures.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from harness.engines import reaper

LOG_TAIL_CHARS = 4000
LOG_SCAN_CHARS = 2**20  # how far back a failure looks for the log's first exception
# A Python exception's line, at the start of a line or after a logger's "[file.py:123] " prefix
FIRST_ERROR = re.compile(r"(?:^|\] )((?:[\w.]+\.)?[A-Z]\w*(?:Error|Exception): .+)$", re.MULTILINE)
MIB = 2**20
STOP_GRACE_S = 10.0  # between SIGTERM and SIGKILL


class ServerStartError(RuntimeError):
    """The server exited while starting, or did not become ready in time; the message has its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel's choice), for the server to bind."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In the server, before exec: the kernel sends it `sig` when the process that launched it dies (a
    worker killed after a timeout must not leave its server running)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


def _cgroup_oom_files() -> list[Path]:
    """Where this process's memory cgroup counts its OOM kills: cgroup v2 `memory.events`, v1
    `memory.oom_control`, at the path /proc/self/cgroup names or, in a container that mounts its own cgroup
    at the root, there."""
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                found += [
                    Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.events",
                    Path("/sys/fs/cgroup/memory.events"),
                ]
            elif "memory" in controllers.split(","):
                root = Path("/sys/fs/cgroup/memory")
                found += [root / path.lstrip("/") / "memory.oom_control", root / "memory.oom_control"]
    return list(dict.fromkeys(found))


def _count(path: Path, prefix: str = "oom_kill ") -> int | None:
    with contextlib.suppress(OSError, StopIteration, ValueError):
        return int(next(line for line in path.read_text().splitlines() if line.startswith(prefix)).split()[1])
    return None


def oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has killed: on the host (/proc/vmstat, Linux 4.13+) plus in this
    process's memory cgroup (where a container's limit is enforced); None where neither can be read. A SIGKILL is
    out of memory only where this count moved."""
    host = _count(Path("/proc/vmstat"))
    group = next((n for n in map(_count, _cgroup_oom_files()) if n is not None), None)
    counts = [n for n in (host, group) if n is not None]
    return sum(counts) if counts else None


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by signal {-code} ({signal.Signals(-code).name})"
    return f"exited with code {code}"


class Server:
    """One launched server process (and its children)."""

    rss_is_the_server = True  # the process tree's memory is the server's own

    def __init__(
        self,
        argv: list[str],
        *,
        host: str,
        port: int,
        log_path: Path,
        ready_path: str = "/health",
        startup_timeout_s: float = 600.0,
        env: dict | None = None,
        parent_death_signal: int = signal.SIGKILL,
    ):
        self.argv, self.host, self.port = argv, host, port
        self.parent_death_signal = parent_death_signal
        self.log_path = Path(log_path)
        self.ready_path, self.startup_timeout_s = ready_path, startup_timeout_s
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.reaper: subprocess.Popen | None = None
        self._oom_kills: int | None = None  # the OOM killer's count when the server started

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> float:
        """Start the server and wait until its readiness route answers 200; returns the seconds it took."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._oom_kills = oom_kills()
        start = time.perf_counter()
        with open(self.log_path, "ab") as log:
            log.write(f"$ {shlex.join(self.argv)}\n".encode())
            log.flush()
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    start_new_session=True,
                    preexec_fn=partial(_die_with_parent, self.parent_death_signal) if sys.platform == "linux" else None,
                )
            except OSError as exc:
                raise ServerStartError(
                    f"the server command could not start: {exc}\n$ {shlex.join(self.argv)}"
                ) from None
        self.reaper = reaper.start(self.proc.pid, STOP_GRACE_S)
        deadline = start + self.startup_timeout_s
        import httpx  # the serve extra's: a run of in-process cells loads this module without it

        with httpx.Client(timeout=httpx.Timeout(2.0)) as http:
            while True:
                code = self.proc.poll()
                if code is not None:
                    self.stop()  # what the server started may outlive it
                    raise ServerStartError(self.failure(f"the server {_describe_exit(code)} while starting"))
                try:
                    if http.get(self.url + self.ready_path).status_code == 200:
                        return time.perf_counter() - start
                except httpx.TransportError:
                    pass
                if time.perf_counter() > deadline:
                    self.stop()
                    raise ServerStartError(
                        self.failure(
                            f"the server did not answer GET {self.ready_path} with 200 within its start-up timeout "
                            f"of {self.startup_timeout_s:g} s; it was stopped"
                        )
                    )
                time.sleep(0.1)

    def failure(self, what: str, since: int = 0) -> str:
        """`what` happened, with the command, the log file, the log's tail (what it wrote after the offset
        `since`, when given: a cell's own lines, not an earlier cell's error), and, where the tail lacks it,
        the first exception of those lines (vLLM's root cause is often thousands of characters above its
        last words)."""
        tail = self.log_tail(since=since)
        first = FIRST_ERROR.search(self.log_tail(chars=LOG_SCAN_CHARS, since=since))
        root = ""
        if first and first.group(1) not in tail:
            root = f"--- first error in the server log ---\n{first.group(1)}\n"
        return f"{what} ($ {shlex.join(self.argv)}; log {self.log_path})\n{root}--- server log (tail) ---\n{tail}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ended(self) -> str | None:
        """How the server ended ("exited with code 1", "was killed by signal 9 (SIGKILL)"); None while it runs."""
        if self.proc is None or self.proc.poll() is None:
            return None
        return _describe_exit(self.proc.returncode)

    def kill_evidence(self) -> str:
        """For a server killed by SIGKILL: whether the kernel's OOM killer acted since it started (the evidence of
        out of memory), said in the words the failure catalog reads; "" for any other end."""
        if self.proc is None or self.proc.returncode != -signal.SIGKILL:
            return ""
        now = oom_kills()
        if now is None or self._oom_kills is None:
            return ", with no out-of-memory evidence (the kernel's OOM-killer counts cannot be read here)"
        if now > self._oom_kills:
            return f"; the kernel's OOM killer killed {now - self._oom_kills} process(es) meanwhile (oom_kill)"
        return ", with no out-of-memory evidence (the kernel's oom_kill counts did not move)"

    def wait_ended(self, timeout_s: float) -> str | None:
        """How the server ended, waiting up to `timeout_s` for it to; None if it still runs."""
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None
        return self.ended()

    def log_tail(self, chars: int = LOG_TAIL_CHARS, since: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(since, f.tell() - chars))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_size(self) -> int:
        """Where the log ends now: `since` for the tail of what comes next."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM to the server's process group and its whole tree, SIGKILL after `grace_s`; then its reaper
        goes, after stopping any process it saw that is still running (one left behind by a parent that died)."""
        if self.proc is None:
            return
        descendants = reaper.snapshot(self.proc.pid)[1:]  # found through the leader, while it lives
        reaper.terminate(self.proc.pid, descendants, grace_s, leader=self.proc)
        if self.reaper:
            self.reaper.stdin.close()
            try:
                self.reaper.wait(timeout=grace_s + 10)
            except subprocess.TimeoutExpired:
                self.reaper.kill()
                self.reaper.wait()
            self.reaper = None

    # -- memory ---------------------------------------------------------------------------------------
    def tree(self) -> list[int]:
        """The server's process and its descendants, from the kernel's children lists (a walk over all of
        /proc, as psutil does it, costs milliseconds per cell)."""
        pids, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                tasks = os.listdir(f"/proc/{pid}/task")
            except FileNotFoundError:
                continue
            pids.append(pid)
            for task in tasks:
                try:
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        todo += [int(child) for child in f.read().split()]
                except FileNotFoundError:
                    continue
        return pids

    def reset_peak(self) -> bool:
        """Restart every tree process's high-water mark at its current RSS; False where not allowed."""
        done = True
        for pid in self.tree():
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                done = False
        return done

    def peak_rss_mib(self) -> float | None:
        """Sum over the process tree of each process's peak RSS since the last reset (MiB)."""
        total, seen = 0, False
        for pid in self.tree():
            try:
                with open(f"/proc/{pid}/status") as f:
                    line = next(line for line in f if line.startswith("VmHWM:"))
            except (OSError, StopIteration):
                continue
            total += int(line.split()[1]) * 1024
            seen = True
        return round(total / MIB, 1) if seen else None


class Container(Server):
    """A `docker run` line (harness/engines/docker.py) as a launched server: started, watched and logged as
    one, stopped by removing its container, and told by SIGTERM (which docker passes on) when the process
    that launched it dies."""

    rss_is_the_server = False  # the tree is the docker client; the container's processes are the daemon's

    def __init__(self, argv: list[str], *, name: str, **kwargs):
        super().__init__(argv, parent_death_signal=signal.SIGTERM, **kwargs)
        self.name = name

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is not None:
            with open(self.log_path, "ab") as log:
                for command in (
                    ["docker", "stop", "--time", str(int(grace_s)), self.name],
                    ["docker", "rm", "-f", self.name],
                ):
                    try:
                        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=grace_s + 30, check=False)
                    except (OSError, subprocess.TimeoutExpired) as exc:
                        log.write(f"qwen-compat: {' '.join(command)}: {exc}\n".encode())
        super().stop(grace_s)


def served_memory(server: Server | None, device: str, gpu, sampler, source: str | None, engine: dict) -> dict:
    """A cell's memory on its server: NVML's peak on a GPU (the sampler `gpu.track` chose), the process
    tree's peak RSS on the CPU, the engine's own figures beside them; None with the reason where out of
    reach (a server the harness did not start; a container, whose processes are not its client's)."""
    unmeasured = {"peak_memory_mib": None, "peak_memory_source": None}
    if server is None:
        return {**unmeasured, "peak_memory_unmeasured": "a black-box endpoint: no local view of its processes"}
    if device == "cpu" and not server.rss_is_the_server:
        why = "a container: its processes are not those of the `docker run` client the harness started"
        return {**unmeasured, "peak_memory_unmeasured": why}
    if device != "cpu":
        measured = {"server_rss_peak_mib": server.peak_rss_mib()} if server.rss_is_the_server else {}
        if sampler and not sampler.failed:
            measured.update(peak_memory_mib=round(sampler.peak, 1), peak_memory_source=source)
        else:
            why = "the method stopped measuring during the cell" if sampler else gpu.why_not
            measured.update(peak_memory_mib=None, peak_memory_source=None, peak_memory_unmeasured=why)
    else:
        peak = server.peak_rss_mib()
        measured = {"peak_memory_mib": peak, "peak_memory_source": "server_rss", "server_rss_peak_mib": peak}
    if "engine_budget_mib" in engine:
        measured["peak_memory_note"] = (
            f"the engine preallocates {engine['engine_budget_mib']:.0f} MiB of the card: a device-level "
            "peak is that fraction; its own weights, KV cache and activation figures are beside it"
        )
    return {**measured, **engine}


# --- what an engine says about its own memory ------------------------------------------------------------

_GIB = r"(-?[\d.]+)\s*Gi?B"
# (measurement, pattern): vLLM V1 (gpu_model_runner / gpu_worker) and V0 (worker.py) log lines; the
# last match wins. vLLM's "GB" in "Loading model weights took ... GB" is computed in GiB.
ENGINE_PATTERNS = [
    ("engine_weights_mib", rf"Model loading took {_GIB}"),
    ("engine_weights_mib", rf"Loading model weights took {_GIB}"),
    ("engine_weights_mib", rf"weights memory: {_GIB}"),
    ("engine_weights_mib", rf"model weights take {_GIB}"),
    ("engine_kv_cache_mib", rf"Available KV cache memory: {_GIB}"),
    ("engine_kv_cache_mib", rf"the rest of the memory reserved for KV Cache is {_GIB}"),
    ("engine_activation_peak_mib", rf"torch peak memory increase: {_GIB}"),
    ("engine_activation_peak_mib", rf"PyTorch activation peak memory takes {_GIB}"),
    ("engine_non_torch_mib", rf"non-torch forward increase memory: {_GIB}"),
    ("engine_non_torch_mib", rf"non_torch_memory takes {_GIB}"),
    ("engine_budget_mib", rf"Requested memory: [\d.]+ \(util\), {_GIB}"),
    ("engine_budget_mib", rf"gpu_memory_utilization \([\d.]+\) = {_GIB}"),
    # vLLM's CPU backend (cpu_worker.py): "Auto set (0.82/23.54) GiB for KV cache on node 0, with 1.88 GiB
    # requested memory for the worker. 1.06 GiB memory was consumed by non-kv usages." or, with an explicit
    # size, "Explicitly set (0.06/23.54) GiB for KV cache on node 0."
    ("engine_kv_cache_mib", r"(?:Auto|Explicitly) set \(([\d.]+)/[\d.]+\) GiB for KV cache"),
    ("engine_budget_mib", rf"with {_GIB} requested memory for the worker"),
    ("engine_non_kv_mib", rf"{_GIB} memory was consumed by non-kv usages"),
]
_KV_TOKENS = re.compile(r"(?:GPU|CPU) KV cache size: ([\d,]+) tokens")


def engine_memory(log: str) -> dict:
    """Named memory figures an engine logged about itself (MiB; KV cache capacity in tokens)."""
    found: dict[str, tuple[int, float]] = {}
    for name, pattern in ENGINE_PATTERNS:
        for match in re.finditer(pattern, log):
            if name not in found or match.start() > found[name][0]:
                found[name] = (match.start(), round(float(match.group(1)) * 1024, 1))
    figures = {name: value for name, (_, value) in found.items()}
    tokens = _KV_TOKENS.findall(log)
    if tokens:
        figures["engine_kv_cache_tokens"] = int(tokens[-1].replace(",", ""))
    return figures


class ServerGpuMemory:
    """A launched server's device memory per NVML, on the GPUs CUDA makes visible to it: made before the
    server starts (so what the devices already used is known), then peaked over each cell by sampling.

    Two methods, best first: `nvml_server_processes`, the usage NVML reports for the server's process
    tree (absent in a container, where NVML shows host pids); `nvml_device_delta`, the devices' used
    memory now less before the server started, valid while no device has more compute processes than
    the server's tree, and only where no process computed on the devices before it (one that leaves
    later would make the delta too small). Neither applying is a `None` peak with the reason, never 0.
    """

    def __init__(self, nvml, visible: str | None):
        from harness.devices import nvml as nvml_mod

        self.nvml, self.why_not = nvml, "nvidia-ml-py (NVML) is not installed or finds no driver"
        self.handles = nvml_mod.visible_handles(nvml, visible) if nvml else []
        if nvml and not self.handles:
            self.why_not = f"NVML has no device for CUDA_VISIBLE_DEVICES={visible!r}"
        self.before = [nvml_mod.quiet_used_mib(nvml, h) for h in self.handles]  # None: a process computed there

    def _processes(self) -> list:
        return [p for h in self.handles for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(h)]

    def _tree_usage(self, pids: list[int]) -> float | None:
        try:
            mine = [p.usedGpuMemory for p in self._processes() if p.pid in pids]
        except Exception:
            return None
        if not mine or any(not used for used in mine):  # None: not available; 0: some container drivers
            return None
        return sum(mine) / MIB

    def _delta(self, pids: list[int]) -> float | None:
        from harness.devices import nvml as nvml_mod

        try:
            if None in self.before:
                return None  # what was "before" may leave: the delta would not be the server's
            if any(len(self.nvml.nvmlDeviceGetComputeRunningProcesses(h)) > len(pids) for h in self.handles):
                return None  # someone else computes on these devices: the delta is not the server's
            return sum(nvml_mod.used_mib(self.nvml, h) - b for h, b in zip(self.handles, self.before, strict=True))
        except Exception:
            return None

    def track(self, pids: list[int]):
        """A sampler (context manager) of the best method that applies now, and its name; (None, None)
        when none applies (`why_not` says why)."""
        from harness.devices.memory import _Sampler

        if not self.handles:
            return None, None
        for name, read in (("nvml_server_processes", self._tree_usage), ("nvml_device_delta", self._delta)):
            if read(pids) is not None:
                return _Sampler(lambda read=read: read(pids)), name
        self.why_not = "NVML shows neither the server's processes nor devices it has to itself"
        return None, None
