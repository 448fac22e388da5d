"""ImageNet FID / sFID / Inception Score / precision / recall, computed as ADM's evaluator (guided-diffusion) does."""
