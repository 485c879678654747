"""Split-free replacements for Ultralytics blocks that torch-pruning's graph cannot follow.

Pruned checkpoints pickle these classes by import path, so they must live in the package.
"""
