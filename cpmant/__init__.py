"""cpmant: the ML core of the CPM-Ant platform (plain PyTorch; never imports Prefect or MLflow)."""

__version__ = "0.1.0"
