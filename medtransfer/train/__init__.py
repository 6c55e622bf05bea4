"""The fine-tuning engine."""
