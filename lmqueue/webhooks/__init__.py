"""Signed webhooks (Standard Webhooks): endpoints per API key, the events they receive, and
their delivery with retries. The API manages endpoints; the scheduler process turns finished
jobs and batches into deliveries and sends them (scheduler/webhooks.py), never a request."""

from __future__ import annotations

JOB_EVENTS = ("job.succeeded", "job.failed")
BATCH_EVENTS = ("batch.completed", "batch.failed", "batch.expired", "batch.cancelled")
EVENT_TYPES = BATCH_EVENTS + JOB_EVENTS
