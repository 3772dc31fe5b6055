"""What a matrix says: the schema, its expansion into cells (ids, selectors, markers, run order),
budgets, placement and launch values, the cells' inputs, the GPU table and the capability rules.

Rule: matrix describes cells; it never loads a model, starts a process or reads a result.
"""
