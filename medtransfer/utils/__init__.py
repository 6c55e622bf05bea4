"""Package-wide utilities with no medical meaning: atomic file writes, devices and precision,
random-number state, the torchrun process group. Every other layer may import them."""
