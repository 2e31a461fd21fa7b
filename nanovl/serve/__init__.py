"""The OpenAI-compatible server (`nanovl serve`)."""
