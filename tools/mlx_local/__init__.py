"""mlx-local: a patched mlx-lm kept alive across upstream releases, run as one local service."""

__version__ = "0.1.0"
