"""tract-bench: train vision models with and without TrAct, reproduce the paper, report the results."""

from tract_bench.tract import TrAct, apply_tract

__all__ = ["TrAct", "apply_tract"]
__version__ = "0.1.0"
