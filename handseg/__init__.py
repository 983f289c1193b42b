"""handseg: 29-class hand-bone segmentation of X-rays, from synthetic data to submission."""

__version__ = "0.1.0"
