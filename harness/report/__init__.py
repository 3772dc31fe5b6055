"""What a run leaves: results (JSON, JSON Lines) and safe writes, provenance, JUnit, CSV and other
exports, the summary page and its plots, the CI job summary, the run lock, progress, the gate, named
baselines and the fleet view.

Rule: report reads and writes records; it never runs a cell or imports torch.
"""
