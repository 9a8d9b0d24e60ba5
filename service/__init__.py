"""Shared by the API and the worker: settings, database, ORM models, object store, API keys, job state."""
