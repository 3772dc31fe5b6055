"""pytest-xdist's `--dist loadgroup` by the cells' own groups.

xdist groups tests by suffixing `@group` to each node id (`item._nodeid`); pytest 9.2 keeps node ids
elsewhere, so with pytest 9.2 and xdist 3.8 the suffix is silently lost and every cell goes wherever a
worker is free: a bfloat16 cell then runs before, or beside, its float32 twin and passes with its drift
unmeasured. The controller knows every cell's group from the matrix, so it schedules by that through
xdist's own extension point (`pytest_xdist_make_scheduler`), whatever the node ids carry.
"""

from __future__ import annotations


def cell_group_scheduler(config, log, groups: dict[str, str]):
    """A LoadScopeScheduling whose scope of a cell's test is the cell's xdist group."""
    from xdist.scheduler import LoadScopeScheduling

    class CellGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if "@" in nodeid.rpartition("]")[2]:  # a suffix xdist did manage to add
                return nodeid.rpartition("@")[2]
            cell = nodeid.rpartition("[")[2].removesuffix("]") if nodeid.endswith("]") else ""
            return groups.get(cell) or nodeid

    return CellGroupScheduling(config, log)
