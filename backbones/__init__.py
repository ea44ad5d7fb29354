"""Networks shared across tasks. Importing this package registers the 2D backbones with timm."""

from backbones import transdae  # noqa: E402,F401  (registers transdae, transdae_tiny)
