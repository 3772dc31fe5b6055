"""What a run leaves: results and safe writes, the summary page, the run lock, progress, the gate,
named baselines and the fleet view.

Rule: report reads and writes records; it never runs a cell or imports torch.
"""
