"""Early-exit inference: KV cache, exit policies, sampling, batched and self-speculative decoding."""
