"""Prefect flows: wiring of the tasks/ into jobs. `flows.compress.compress(job_id)` is the service's job."""
