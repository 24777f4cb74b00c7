"""The scheduler process: autoscaling reconcile loop, backends, and recovery of lost work.

Imports neither torch nor FastAPI."""
