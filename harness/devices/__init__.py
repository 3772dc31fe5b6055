"""The host's accelerators as NVML and CUDA see them: the card this host is, each worker's visible GPU,
memory measured while a cell runs, emulation of a smaller card.

Rule: devices measures and detects; it never loads a model or judges a figure.
"""
