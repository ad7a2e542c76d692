"""KVzip: query-agnostic KV cache compression by context reconstruction (prompts, scoring, selection, caches)."""
