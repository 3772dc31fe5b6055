"""The default suite: every matrix cell runs real inference in the isolated worker.

It passes when there is no runtime error, peak memory is under the cell's budget, and the output
is sane (new tokens, finite logits, not degenerate, close to float32). Write your own suite the
same way: a test taking `cell` (the cell's axes) or `cell_run` (the cell run and judged).
"""


def test_cell(cell_run):
    cell_run.check()
