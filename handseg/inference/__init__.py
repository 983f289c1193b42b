"""Inference: runtime (device, AMP), TTA, the predictor, a prediction run, cascade context."""
