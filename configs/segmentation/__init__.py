"""Segmentation presets (``mri.yaml``, ``ct.yaml``), kept apart from the classification presets."""
