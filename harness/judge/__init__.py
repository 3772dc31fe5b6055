"""What a result means: the result type the worker fills, the verdict, failure classification,
remedies, drift against float32 and agreement with an in-process twin.

Rule: judge reads what run returned; it never starts a process, and nothing in it knows how the
result was produced (it sits below run so that the worker can classify its own failure).
"""
