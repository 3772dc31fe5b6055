"""The plugin's options, each one a command-line flag, an ini key and an environment variable.

`--compat-matrix m.yaml`, `[tool.pytest.ini_options] compat_matrix = "m.yaml"` and
`QWEN_COMPAT_MATRIX=m.yaml` say the same thing; the flag wins over the variable, the variable over
the ini key (a CI job overrides a project's ini without editing it). All names share one prefix, as
pytest-benchmark's do, so the plugin installs beside plugins with generic option names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Option:
    name: str  # without the prefix: matrix -> --compat-matrix, compat_matrix, QWEN_COMPAT_MATRIX
    help: str
    flag: bool = False
    default: str | None = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return "compat_" + self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return "QWEN_COMPAT_" + self.name.replace("-", "_").upper()


OPTIONS = (
    Option("matrix", "matrix YAML file (default: <rootdir>/matrices/default.yaml)"),
    Option("device", "auto (NVML, then torch, else cpu) or a GPU table key", default="auto"),
    Option("reports", "reports folder; results go to <reports>/<device>/", default="reports"),
    Option("resume", "skip cells already in <reports>/<device>/results.json whose definition is unchanged", True),
    Option("allow-faults", "honour the matrix's `faults:` section", True),
    Option("emulate", "emulate a GPU table card on this GPU: its memory size and capability rules", metavar="KEY"),
    Option("gpu-per-worker", "with pytest-xdist: each worker drives its own GPU of CUDA_VISIBLE_DEVICES", True),
    Option(
        "save-baseline", "after the run, keep its results as baseline NAME under <reports>/baselines/", metavar="NAME"
    ),
    Option("run-predicted-oom", "run cells the memory plan predicts to exceed the card", True),
    Option("lenient", "record a served cell's HTTP error as a skip instead of a failure (default: strict)", True),
    Option(
        "junit-properties",
        "also write each cell's measurements as JUnit test-case <properties> (outside Jenkins' schema)",
        True,
    ),
)


def add(parser) -> None:
    group = parser.getgroup("qwen-compat", "qwen-compat hardware-compatibility matrix")
    for o in OPTIONS:
        help_text = f"{o.help} [ini: {o.dest}; env: {o.env}]"
        if o.flag:
            group.addoption(f"--compat-{o.name}", action="store_true", default=None, dest=o.dest, help=help_text)
            parser.addini(o.dest, o.help, type="bool", default=False)
        else:
            group.addoption(f"--compat-{o.name}", default=None, dest=o.dest, metavar=o.metavar, help=help_text)
            parser.addini(o.dest, o.help, default=None)


def value(config, dest: str):
    """The option's value: the flag, else the environment variable, else the ini key, else the default."""
    option = next(o for o in OPTIONS if o.dest == dest)
    given = config.getoption(dest)
    if given is not None:
        return given
    env = os.environ.get(option.env)
    if env not in (None, ""):
        return env.strip().lower() in TRUE if option.flag else env
    ini = config.getini(dest)
    if option.flag:
        return bool(ini)
    return ini or option.default


def given(config, dest: str) -> bool:
    """Whether the user set the option anywhere (flag, variable or ini key)."""
    option = next(o for o in OPTIONS if o.dest == dest)
    return config.getoption(dest) is not None or bool(os.environ.get(option.env)) or bool(config.getini(dest))
