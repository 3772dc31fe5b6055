"""Backends: what runs a cell's model. `openai` sends each cell to an OpenAI-compatible server (one the
release pipeline started, or one the harness launches from a template); the server's side of that
(templates, process lifecycle, memory) is `harness.serving`.
"""
