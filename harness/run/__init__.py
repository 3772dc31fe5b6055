"""Running cells: the parent's runner, the isolated worker process, backends (transformers in-process,
openai over a server), load and generate, and what happens to a cell on this host.

Rule: run produces results; only the worker (and what it imports) touches torch, and the verdict
is the judge's, never run's.
"""
