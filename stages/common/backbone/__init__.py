"""CNN backbones shared by the global (stage 1) and local (stage 2) feature extractors."""
