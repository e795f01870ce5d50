"""Stage 1: a global CNN descriptor per image, and faiss ranking of all references."""
