"""File formats stages pass to each other (numpy only, no torch): RLE, CSV, crops, maps, recipes."""
