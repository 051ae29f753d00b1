"""Hooks around each provider call, one module per concern; `base` holds the contract they share."""
