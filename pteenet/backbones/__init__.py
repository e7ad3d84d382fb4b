"""Backbones: spec strings to frozen modules (torchvision, timm, CIFAR ResNets, user factories) and their weights."""
