"""Department node side: dataset adapters and the local training loop."""
