"""Cells over an OpenAI-compatible server, in three parts: `request` (a cell as one chat-completion body: its
pixels as data URLs, greedy decoding, streamed), `stream` (the client: sending it, and what the server-sent
events say, timings and token counts included) and `group` (a model entry's server, reached at an `endpoint:`
or launched from `launch:`, and running its cells: memory, faults, a server that dies or declines).
"""
