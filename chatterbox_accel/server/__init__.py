"""The OpenAI-compatible speech server on the engine (see app.py)."""
