"""Level 6: what compression changed — per-layer reports, sweeps over budgets with their Pareto
front, and plots of both."""
