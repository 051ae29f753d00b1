-- Create a job record once; a second submit of the same job id, or of the same
-- custom_id within a batch, is refused and returns the existing job id.
--
-- KEYS[1] job hash            KEYS[2] batch hash         KEYS[3] batch job-id list
-- KEYS[4] batch custom_id map KEYS[5] delayed zset       KEYS[6] deadlines zset
-- KEYS[7] outbox list         KEYS[8] provider-batch intake zset of the job's first hop
-- ARGV[1] job id              ARGV[2] batch id or ""     ARGV[3] custom id or ""
-- ARGV[4] deadline_ms (relative)                         ARGV[5] publish_grace_ms
-- ARGV[6] record ttl_s        ARGV[7] first state: "queued" (published by the caller) or
--         "in_provider_batch" (waits in KEYS[8] to be grouped into a provider batch: no message)
-- ARGV[8..] field, value pairs for the job hash
-- Returns {1, job_id} when created, {0, existing_job_id} when a duplicate.
local job_id, batch_id, custom_id = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, job_id}
end
if batch_id ~= '' and custom_id ~= '' then
  local existing = redis.call('HGET', KEYS[4], custom_id)
  if existing then
    return {0, existing}
  end
  redis.call('HSET', KEYS[4], custom_id, job_id)
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = ARGV[7]
local fields = {}
for i = 8, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], 'state', state, 'dispatch', '1', 'published', '1', 'attempt', '0',
  'route_index', '0', 'hop_attempt', '0', 'created_at', now_ms, 'updated_at', now_ms,
  'deadline_at', now_ms + tonumber(ARGV[4]), unpack(fields))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[6]))
if batch_id ~= '' then
  redis.call('RPUSH', KEYS[3], job_id)
  redis.call('HINCRBY', KEYS[2], 'total', 1)
  redis.call('HINCRBY', KEYS[2], state, 1)
end
if state == 'in_provider_batch' then
  -- No message: a worker groups it into a provider batch (worker/batches/assemble.py).
  redis.call('ZADD', KEYS[8], now_ms, job_id)
else
  -- Published by the caller right away; this entry is the job's watchdog until a worker
  -- claims it (promote.lua re-publishes if the message is lost, e.g. the caller died first).
  redis.call('ZADD', KEYS[5], now_ms + tonumber(ARGV[5]), job_id)
end
redis.call('ZADD', KEYS[6], now_ms + tonumber(ARGV[4]), job_id)
redis.call('RPUSH', KEYS[7], cjson.encode({kind = 'job', job_id = job_id}))
return {1, job_id}
