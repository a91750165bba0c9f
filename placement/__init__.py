"""moeplace: plan which GPU holds which Mixture-of-Experts expert, from real routing traces.

The application package: affinity model, plan schema, evaluation, cost model, exporters, runtime and CLI.
"""

__version__ = "0.1.0"
