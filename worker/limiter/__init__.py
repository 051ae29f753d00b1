"""The fleet-wide rate limiter: Lua scripts on Redis's clock, driven from a small Python package."""
