"""Networks shared across tasks. Importing this package registers the 2D backbones with timm."""
