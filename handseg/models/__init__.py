"""Models: the architecture registry and size plan, building, foreign weights, checkpoints, losses."""
