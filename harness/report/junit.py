"""reports/<device>/junit.xml: the device's cells as JUnit that CI systems read as they are.

Written from results.json, so it holds every cell of the folder (a resumed run's earlier cells too) and
validates against Jenkins' JUnit schema (junit-10.xsd of jenkinsci/xunit-plugin), which test-case
`<properties>` break. Each cell's axes and measurements are `key=value` lines in its `<system-out>`,
the place JUnit readers show; the run's facts are suite properties. Test-case properties are opt-in
(`compat_junit_properties = true` in the pytest ini), for tools that read them and no schema.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from harness.matrix.schema import AXIS_FIELDS
from harness.report.provenance import recorded_runner
from harness.report.results import latest_records

SUITE_DEFAULT = "pytest"  # pytest's own junit_suite_name: not chosen by the user
FAILED = {"failed", "xpassed-strict"}
SKIPPED = {"skipped", "xfailed"}
CELL_KEYS = ("id", "outcome", "category", *AXIS_FIELDS)  # a record's id, its outcome and the cell's axes
ENVIRONMENT_KEYS = (
    "gpu_name",
    "driver",
    "cuda",
    "torch",
    "torch_cuda",
    "torch_arch_list",
    "transformers",
    "vllm",
    "flash_attn",
    "python",
    "host",
)
XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


@dataclass(frozen=True)
class JUnitOptions:
    suite_name: str | None = None  # the user's junit_suite_name; None: named after the device and runner
    prefix: str | None = None  # --junit-prefix, put before every classname as pytest does
    properties: bool = False  # also write each cell's measurements as test-case <properties>

    @classmethod
    def from_config(cls, config, properties: bool = False) -> JUnitOptions:
        """pytest's own JUnit settings (junit_suite_name, --junit-prefix) from its config."""
        name = config.getini("junit_suite_name")
        return cls(
            suite_name=None if name == SUITE_DEFAULT else name,
            prefix=getattr(config.option, "junitprefix", None),
            properties=bool(properties),
        )


def _text(value) -> str:
    """A string XML 1.0 can hold: control characters that it cannot are written as \\xNN."""
    return XML_ILLEGAL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


def flatten(value, prefix: str = "") -> dict[str, object]:
    """Nested measurements as dotted keys (latency.prefill_s.median); None and empty values left out."""
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if value is None or value == "" or value == {} or value == []:
        return {}
    return {prefix: value}


def key_values(record: dict) -> dict[str, object]:
    """What a cell's <system-out> lists: its axes and outcome, the plan's prediction, every measurement."""
    values = {key: record.get(key) for key in CELL_KEYS}
    values["predicted_peak_mib"] = (record.get("prediction") or {}).get("predicted_peak_mib")
    values.update(flatten(record.get("measurements") or {}))
    values["unchecked"] = "; ".join(record.get("unchecked") or []) or None
    return {key: value for key, value in values.items() if value is not None and value != ""}


def suite_name(env: dict, options: JUnitOptions) -> str:
    return options.suite_name or f"qwen-compat {env.get('device', '?')} on {recorded_runner(env)}"


def _names(record: dict, device: str, prefix: str | None) -> tuple[str, str]:
    """classname and name as pytest writes them for the cell's test (from its node id), or, for records
    without one, the device and the cell id."""
    test = record.get("test")
    if test:
        path, *names = test.split("::")
        classes = [re.sub(r"\.py$", "", path).replace("/", "."), *names[:-1]]
        name = names[-1] if names else record["id"]
    else:
        classes, name = ["qwen-compat", device], record["id"]
    return ".".join([prefix, *classes] if prefix else classes), name


def _verdict(record: dict) -> ET.Element | None:
    outcome = record.get("outcome")
    category, message = record.get("category"), (record.get("message") or "").strip()
    headline = f"[{category}] {message}" if category and outcome != "skipped" else message
    if outcome in FAILED or outcome == "error":
        element = ET.Element("failure" if outcome in FAILED else "error", type=_text(category or outcome))
        body = [message or outcome]
        if record.get("remedy"):
            body.append(f"remedy: {record['remedy']}")
        if record.get("stderr_tail"):
            body.append(f"--- worker stderr (tail) ---\n{record['stderr_tail']}")
        element.text = _text("\n".join(body))
    elif outcome in SKIPPED:
        element = ET.Element("skipped", type="pytest.xfail" if outcome == "xfailed" else "pytest.skip")
    else:
        return None
    element.set("message", _text(headline.split("\n")[0][:500]))
    return element


def _testcase(record: dict, device: str, options: JUnitOptions) -> ET.Element:
    classname, name = _names(record, device, options.prefix)
    case = ET.Element("testcase", classname=_text(classname), name=_text(name))
    case.set("time", f"{float(record.get('duration_s') or 0):.3f}")
    values = key_values(record)
    if options.properties:
        properties = ET.SubElement(case, "properties")
        for key, value in values.items():
            ET.SubElement(properties, "property", name=_text(key), value=_text(value))
    verdict = _verdict(record)
    if verdict is not None:
        case.append(verdict)
    ET.SubElement(case, "system-out").text = _text("".join(f"{k}={v}\n" for k, v in values.items()))
    return case


def junit_xml(data: dict, options: JUnitOptions = JUnitOptions()) -> str:
    """The JUnit document of one device's results (as loaded from results.json)."""
    env = data.get("environment") or {}
    device = env.get("device", "?")
    cells = list(latest_records(data).values())
    outcomes = [c.get("outcome") for c in cells]
    counts = {
        "tests": len(cells),
        "failures": sum(o in FAILED for o in outcomes),
        "errors": outcomes.count("error"),
        "skipped": sum(o in SKIPPED for o in outcomes),
    }
    seconds = f"{sum(float(c.get('duration_s') or 0) for c in cells):.3f}"
    root = ET.Element(
        "testsuites", name="qwen-compat", time=seconds, **{k: str(counts[k]) for k in counts if k != "skipped"}
    )
    suite = ET.SubElement(root, "testsuite", name=_text(suite_name(env, options)), time=seconds)
    for key, value in counts.items():
        suite.set(key, str(value))
    provenance = env.get("provenance") or {}
    if provenance.get("started_utc"):
        suite.set("timestamp", provenance["started_utc"])
    if env.get("host"):
        suite.set("hostname", _text(env["host"]))
    facts = {**{key: env.get(key) for key in ENVIRONMENT_KEYS}, **flatten(provenance, "provenance")}
    properties = ET.SubElement(suite, "properties")
    for key, value in facts.items():
        if value is not None and value != "":
            value = " ".join(map(str, value)) if isinstance(value, list) else value
            ET.SubElement(properties, "property", name=key, value=_text(value))
    for record in cells:
        suite.append(_testcase(record, device, options))
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
