"""Networks shared across tasks. Importing this package registers the 2D backbones with timm."""

from backbones import transnext  # noqa: F401  (registers transnext_{micro,tiny,small,base,test})
from backbones import afmnet  # noqa: E402,F401  (registers afmnet_tiny, afmnet_small, afmnet_base)
from backbones import transdae  # noqa: E402,F401  (registers transdae, transdae_tiny)
