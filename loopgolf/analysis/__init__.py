"""Pure functions over the trials DataFrame: loading, Pareto fronts, the report."""
