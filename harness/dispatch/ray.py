"""The fleet on a Ray cluster: each node advertises its card as the resource `accelerator_type:<name>` (Ray's
automatic label on GPU nodes, or `ray start --resources`); each chunk of a device's cells becomes a Ray task
pinned to one node that advertises the device's accelerator type, streaming its finished cells back.

One chunk runs on a node at a time (its pytest session drives all of the node's GPUs, one xdist worker
each); a free node takes the next chunk of its device, largest first. A node that dies or cannot run the
cells hands its unfinished ones to another node of the type; with none left they are recorded as not run,
with the reason. The project reaches the nodes through Ray's runtime environment (the working directory).
"""

from __future__ import annotations

import importlib.util
import socket
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import harness
from harness.devices.host import detect_host
from harness.dispatch import session
from harness.dispatch.work import Chunk, Work
from harness.errors import UserError
from harness.matrix.gpus import covers, table

# Never shipped: reports and caches (Ray leaves out .git and .venv itself, and honours the .gitignore).
EXCLUDES = ["/reports", "__pycache__", ".pytest_cache", ".hypothesis", ".benchmarks"]


@dataclass(frozen=True)
class Node:
    id: str
    ip: str
    gpus: int
    accelerators: frozenset[str]  # X of every `accelerator_type:X` it advertises

    @property
    def label(self) -> str:
        return f"{self.id[:8]} ({self.ip})"


def resource(device: str) -> str | None:
    name = table()[device].ray_accelerator
    return f"accelerator_type:{name}" if name else None


def no_node_reason(device: str, other: bool = False) -> str:
    which = "no other node" if other else "no node"
    if resource(device) is None:
        return f"{which} in the cluster has a CPU to give a pytest session"
    return f"{which} in the cluster advertises {resource(device)}"


def _no_cluster(address: str, why: str) -> UserError:
    return UserError(
        f"no Ray cluster answered at {address} ({why}).",
        key="--ray",
        fix="start one (`ray start --head` on the head machine, then `ray start --address HEAD:6379` on each "
        "node) and pass its address, e.g. --ray 10.0.0.1:6379, or --ray local for a cluster in this process.",
    )


def _probe(address: str) -> None:
    """Fail in a second on a wrong address: ray.init itself retries a closed port for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(
            f"--ray {address} is not a cluster address.",
            key="--ray",
            fix="pass HOST:PORT of the head (what `ray start --head` printed, default port 6379), or local.",
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as err:
        raise _no_cluster(address, err.strerror or type(err).__name__) from None


def connect(address: str, project: Path) -> None:
    """Join the cluster (or start one in this process for `local`), shipping the project as the working dir."""
    if address != "local":
        _probe(address)
    runtime_env: dict = {"working_dir": str(project), "excludes": EXCLUDES}
    package = Path(harness.__file__).resolve().parent
    if not package.is_relative_to(project):  # an installed qwen-compat: its package goes as a module
        runtime_env["py_modules"] = [str(package)]
    options = {"runtime_env": runtime_env, "log_to_driver": False, "logging_level": "WARNING"}
    try:
        if address == "local":
            ray.init(address="local", include_dashboard=False, **options)
        else:
            ray.init(address=address, **options)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise _no_cluster(address, _first_line(err)) from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def alive_nodes() -> list[Node]:
    """Nodes that can run a pytest session (a CPU to give it); a head started with --num-cpus 0 runs none."""
    nodes = []
    for info in ray.nodes():
        resources = info.get("Resources") or {}
        if not info.get("Alive") or resources.get("CPU", 0) < 1:
            continue
        accelerators = frozenset(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:"))
        nodes.append(Node(info["NodeID"], info["NodeManagerAddress"], int(resources.get("GPU", 0)), accelerators))
    return nodes


def pools(devices, nodes: list[Node]) -> dict[str, list[Node]]:
    """device -> the nodes that may run its cells: those advertising its accelerator type; for `cpu`, the
    nodes advertising none (all nodes, where every one has a card)."""
    out = {}
    for device in devices:
        name = table()[device].ray_accelerator
        if name:
            out[device] = [n for n in nodes if name in n.accelerators]
        else:
            out[device] = [n for n in nodes if not n.accelerators and not n.gpus] or list(nodes)
    return out


@dataclass
class Payload:
    """What a node needs to run a chunk: its cells and how (the project itself comes with the runtime env)."""

    matrix: str
    device: str
    node_ids: list[str]
    pytest_args: list[str]
    allow_emulated: bool


@ray.remote(num_returns="streaming", max_retries=0, num_cpus=1)
def _chunk_task(payload: Payload):
    yield from on_node(payload)


def on_node(payload: Payload):
    """The node side: check the node can run the cells, then stream its session's messages."""
    context = ray.get_runtime_context()
    node_id, ip = context.get_node_id(), ray.util.get_node_ip_address()
    here = f"node {node_id[:8]} ({ip})"
    missing = session.missing_packages()
    if missing:
        yield {
            "kind": "refused",
            "reason": f"{here} cannot import {', '.join(missing)} in the Python that runs its Ray worker "
            "(install the project's dependencies there: pip install 'qwen-compat[torch,ray]', or keep the "
            "node's own torch and pip install 'qwen-compat[ray]')",
            "node_unusable": True,
        }
        return
    device, env, extra, emulated, card = payload.device, {}, [], False, payload.device
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU's cells never run on a GPU the node happens to have
    else:
        found = detect_host()
        card = found.key  # a family's cells (v100) run as the node's size (v100-32gb)
        if found.key not in table() or not covers(device, found.key):
            if found.key != "cpu" or not payload.allow_emulated:
                has = "no GPU" if found.key == "cpu" else f"a {found.name} ({found.key})"
                yield {
                    "kind": "refused",
                    "reason": f"{here} advertises {resource(device)} but has {has}; its cells would not "
                    "describe the card (correct the node's --resources, or pass --emulated-accelerators to "
                    "run a card's cells on a CPU node on purpose)",
                    "node_unusable": False,
                }
                return
            emulated, card = True, device
        gpus = len(ray.get_gpu_ids())
        if gpus > 1 and importlib.util.find_spec("xdist"):
            extra = ["-n", str(gpus), "--compat-gpu-per-worker"]
    spec = session.Spec(
        matrix=payload.matrix,
        device=device if device == "cpu" or emulated else "auto",
        reports_key=card,
        node_ids=payload.node_ids,
        pytest_args=payload.pytest_args,
        extra_args=extra,
        env=env,
        annotations={"node_id": node_id, "node_ip": ip, "emulated_accelerator": emulated},
    )
    with tempfile.TemporaryDirectory(prefix="qwen-compat-fleet-") as folder:
        yield from session.run(spec, Path(folder))


@dataclass
class Running:
    chunk: Chunk
    node: Node
    received: set[str] = field(default_factory=set)
    end: dict | None = None


class Scheduler:
    """Hands chunks to free nodes of their device, passes each message to `sink`, re-runs what a lost node
    left, and records as not run what no node is left to run (through `sink.not_run`)."""

    def __init__(self, work: Work, pools: dict[str, list[Node]], sink, allow_emulated: bool):
        self.work, self.sink, self.allow_emulated = work, sink, allow_emulated
        self.pools = {device: list(nodes) for device, nodes in pools.items()}
        self.queue = {device: deque(chunks) for device, chunks in work.chunks.items()}
        self.running: dict = {}  # ObjectRefGenerator -> Running
        self.why_gone: dict[str, str] = {}  # device -> what happened to the nodes it had

    def run(self) -> None:
        try:
            while any(self.queue.values()) or self.running:
                self._submit()
                if not self.running:
                    continue
                ready, _ = ray.wait(list(self.running), num_returns=1, timeout=0.5)
                for generator in ready:
                    self._advance(generator)
        except KeyboardInterrupt:
            self._cancel()
            raise

    def _busy(self) -> set[str]:
        return {r.node.id for r in self.running.values()}

    def _submit(self) -> None:
        """Give every free node the next chunk of its device; then record what no node is left for (after
        submitting, so that the nodes start while this machine writes those records)."""
        orphans = []
        for device, queue in self.queue.items():
            if not self.pools[device] and queue:
                reason = no_node_reason(device)
                if device in self.why_gone:
                    reason = f"{self.why_gone[device]}, and {no_node_reason(device, other=True)}"
                orphans.append((Chunk.joined(list(queue)), reason))  # one session records them all
                queue.clear()
            while queue:
                free = [n for n in self.pools[device] if n.id not in self._busy()]
                if not free:
                    break
                chunk, node = queue.popleft(), free[0]
                self.running[self._start(chunk, node)] = Running(chunk, node)
        for chunk, reason in orphans:
            self.sink.not_run(chunk, reason)

    def _start(self, chunk: Chunk, node: Node):
        payload = Payload(
            self.work.matrix, chunk.device, list(chunk.node_ids), self.work.node_args, self.allow_emulated
        )
        name = resource(chunk.device)
        return _chunk_task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.id, soft=False),
            resources={name: 0.001} if name else {},
            num_gpus=node.gpus if name else 0,
        ).remote(payload)

    def _advance(self, generator) -> None:
        run = self.running[generator]
        try:
            ref = next(generator)
        except StopIteration:
            self._finished(generator)
            return
        try:
            message = ray.get(ref)
        except ray.exceptions.RayError as err:
            self._lost(generator, err)
            return
        device = run.chunk.device
        if message["kind"] == "refused":
            self.sink.note(message["reason"])
            self._drop(run.node, device, message["reason"], everywhere=message["node_unusable"])
            self.queue[device].appendleft(run.chunk)
            return
        if message["kind"] == "cell":
            run.received.add(message["record"]["id"])
        elif message["kind"] == "end":
            run.end = message
        self.sink.take(device, message)

    def _finished(self, generator) -> None:
        run = self.running.pop(generator)
        rest = run.chunk.without(run.received)
        if rest and run.end is not None:
            last = [line for line in run.end["output_tail"].splitlines() if line.strip()][-3:]
            self.sink.not_run(
                rest,
                f"the pytest session on node {run.node.label} ended (exit {run.end['returncode']}) without "
                f"running them: {' / '.join(last)}",
            )

    def _lost(self, generator, err: Exception) -> None:
        run = self.running.pop(generator)
        reason = f"node {run.node.label} was lost while running them ({type(err).__name__}: {_first_line(err)})"
        self.sink.note(f"{run.chunk.device}: {reason}; {len(run.received)} cells it finished are kept")
        self._drop(run.node, run.chunk.device, reason, everywhere=True)
        rest = run.chunk.without(run.received)
        if rest:
            self.queue[run.chunk.device].appendleft(rest)

    def _drop(self, node: Node, device: str, reason: str, everywhere: bool) -> None:
        for name, nodes in self.pools.items():
            if name == device or everywhere:
                if node in nodes:
                    nodes.remove(node)
                    self.why_gone[name] = reason

    def _cancel(self) -> None:
        """Ctrl-C / SIGTERM: cancel every task (its session is stopped, its cells so far are kept) and take
        what arrives while they stop."""
        for generator in self.running:
            ray.cancel(generator)
        deadline = time.monotonic() + session.STOP_GRACE_S + 5
        while self.running and time.monotonic() < deadline:
            ready, _ = ray.wait(list(self.running), num_returns=1, timeout=0.5)
            for generator in ready:
                run = self.running[generator]
                try:
                    message = ray.get(next(generator))
                except (StopIteration, ray.exceptions.RayError):
                    del self.running[generator]
                    continue
                if message["kind"] in ("cell", "end"):
                    self.sink.take(run.chunk.device, message)
