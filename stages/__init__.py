"""Pipeline stages: global_embed (stage 1), local_delf (stage 2), rerank (stage 3)."""
