"""Dispatch: a matrix's devices sent to the machines that have them (`qwen-compat fleet --ray`), each running
the harness's own pytest session there, the reports merged back on the head."""
