"""Servers: launch templates for each engine, the engines' own environments (found on PATH or built by
`qwen-compat engine install`), a launched server's lifecycle and memory, and whether an engine can run
a cell here.

Rule: engines starts and stops servers; it never sends a cell's request or judges an answer.
"""
