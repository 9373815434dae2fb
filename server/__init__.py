"""Coordinator side (Flower ServerApp, strategies, checkpoints).

The federated coordinator lands with the federated-training issue; today the package
holds nothing that runs, and no console script points at it.
"""
