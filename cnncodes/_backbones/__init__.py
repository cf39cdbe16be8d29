"""Backbones: the registry and its layer table, the codes model cut from a network, custom and timm backbones, weights (torchvision's and files)."""
