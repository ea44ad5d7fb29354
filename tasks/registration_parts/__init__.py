"""The pieces of VBReg (``tasks/registration.py``): rigid-motion algebra, the variational non-local
network, the voting-based inlier search, metrics, classical baselines and pictures."""
