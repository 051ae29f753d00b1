"""The fleet-wide rate limiter: small Lua scripts on Redis's clock, driven from this package.

- `limits`: every kind of limit (requests/min, tokens/min, per model, calls in flight, daily
  quotas), where the config sets it, and the named groups the scripts take;
- `limiter`: `RateLimiter`, one method per script (acquire, settle, release, renew, penalize,
  snapshot), and the observer that turns providers' headers into pauses;
- `scripts`: loads lua/<operation>.lua behind lua/prelude.lua and reads their name/value answers;
- `headers`: providers' rate-limit headers, read; `estimate`: what a call reserves.

docs/rate-limits.md explains the choices (pacing, the line, claims, settling).
"""
