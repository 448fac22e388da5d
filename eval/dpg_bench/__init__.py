"""DPG-Bench: dense-prompt text-to-image benchmark (2×2 tiled generation, VQA scoring with the dependency rule)."""
