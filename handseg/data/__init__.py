"""Data: layout discovery, images (with DICOM), labels, anatomy, caches, folds, meta data, synthetic X-rays."""
