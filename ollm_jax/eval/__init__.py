"""Quality of KV cache formats: perplexity and KL through the cache path
(`ollm_jax.eval.quality`) and passkey retrieval (`ollm_jax.eval.passkey`).

Both take any `kv_format` name `ollm_jax.kv_cache` accepts and compare it with a dense
reference cache in the model's own dtype. Their command lines write the results file
behind `docs/kv_quality.md`.
"""
