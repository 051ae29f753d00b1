"""What the client and the worker agree on; both import it, it imports neither.

- `models`: `LLMRequest` / `LLMResponse` (ADR-0015), job and batch records, `JobState`
- `config`: the YAML config model and its loader
- `keys`: every Redis key, task and queue name
- `jobs` + `lua/`: the job state machine, one Lua script per transition
- `routing`: a request's route of (provider, model) hops
- `queueing`: the Celery and Redis clients both sides build on the same settings
- `streams`: the entry format of a streamed job's Redis Stream
- `schema`: the SQL ledger's tables
"""
