-- A worker takes a job it received from the broker: only the current dispatch of
-- a job that is waiting to run may start; anything else is a stale or duplicate
-- message and is dropped.
--
-- KEYS[1] job hash  KEYS[2] batch hash key prefix (the job's batch_id completes it)
-- KEYS[3] leases zset  KEYS[4] delayed zset
-- ARGV[1] dispatch carried by the message  ARGV[2] worker id  ARGV[3] lease_ms
-- Returns {"ok", <job hash as flat list>} or {"skip", state or "missing", dispatch}
-- or {"expired", state} when the job's deadline has passed (the caller fails it).
local current = redis.call('HMGET', KEYS[1], 'state', 'dispatch', 'batch_id', 'deadline_at', 'job_id')
local state, dispatch, batch_id, deadline_at, job_id = current[1], current[2], current[3], current[4], current[5]
if not state then
  return {'skip', 'missing', '0'}
end
if dispatch ~= ARGV[1] or not (state == 'queued' or state == 'retrying' or state == 'rate_limited') then
  return {'skip', state, dispatch}
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if deadline_at and tonumber(deadline_at) <= now_ms then
  return {'expired', state, dispatch}
end
redis.call('HSET', KEYS[1], 'state', 'running', 'updated_at', now_ms, 'started_at', now_ms, 'worker', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HINCRBY', KEYS[1], 'hop_attempt', 1)
if batch_id and batch_id ~= '' then
  redis.call('HINCRBY', KEYS[2] .. batch_id, state, -1)
  redis.call('HINCRBY', KEYS[2] .. batch_id, 'running', 1)
end
redis.call('ZADD', KEYS[3], now_ms + tonumber(ARGV[3]), job_id)
redis.call('ZREM', KEYS[4], job_id)
return {'ok', redis.call('HGETALL', KEYS[1])}
