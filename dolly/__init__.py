"""dolly: Databricks' Dolly recipe (GPT-J + Alpaca + DeepSpeed ZeRO-3) as an MLflow pipeline."""

__version__ = "0.1.0"
