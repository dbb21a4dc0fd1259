"""The OpenAI-compatible HTTP API and the dashboard."""
