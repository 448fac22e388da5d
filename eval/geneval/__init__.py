"""GenEval: compositional text-to-image benchmark (generation in the official layout, scoring by its rules)."""
