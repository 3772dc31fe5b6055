"""A pytest plugin for the cells a fleet run could not run (no node has the card, the node died, the node
lacks the project): `-p harness.dispatch.not_run --fleet-not-run REASON` skips every selected cell with
that reason, so that the harness's own session records them (results.json, JUnit, summary) as not run."""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.getgroup("qwen-compat").addoption(
        "--fleet-not-run", metavar="REASON", help="(qwen-compat fleet) record every selected cell as not run: REASON"
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    reason = config.getoption("fleet_not_run")
    if reason:
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            item.add_marker(skip, append=False)  # before the cell's own marks: this reason is the one pytest gives
