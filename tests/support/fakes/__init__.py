"""Fake provider servers: real HTTP on loopback, each provider's real wire format."""
