"""Memory planning: what a model needs (weights, KV cache, prompt cache) against this machine."""
