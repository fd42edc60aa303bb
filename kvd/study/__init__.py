"""Studies over runs: `kvd compare` (statistics, reports, plots) and `kvd ab` (experiment grids)."""
