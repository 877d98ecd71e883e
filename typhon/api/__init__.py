"""The HTTP API (runs, webhooks, activity, hardware, metrics)."""
