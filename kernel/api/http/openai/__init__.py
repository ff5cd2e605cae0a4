"""OpenAI-compatible /v1 and /metrics: routes over the edge."""
