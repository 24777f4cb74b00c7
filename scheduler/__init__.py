"""The scheduler process: queue-depth autoscaling of workers, and recovery of lost jobs.

Imports neither torch nor FastAPI; it talks to Redis, the result store and worker backends.
"""
