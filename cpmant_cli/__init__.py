"""The `cpmant` console script."""
