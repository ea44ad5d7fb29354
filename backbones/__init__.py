"""Networks shared across tasks. Importing this package registers the 2D backbones with timm."""

from backbones import transnext  # noqa: F401  (registers transnext_{micro,tiny,small,base,test})
