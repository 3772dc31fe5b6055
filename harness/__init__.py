"""qwen-compat: hardware-compatibility test harness for Qwen vision-language models.

Flow: matrix (what to test) -> cells -> device (where) -> worker (how, isolated)
-> measurements -> verdict -> reports -> gate.
"""

__version__ = "0.1.0"
