-- Hand out delayed jobs that are due, for the caller to publish to their queues.
--
-- Every waiting job keeps an entry here until a worker claims it; it is the job's
-- watchdog. A due entry whose current dispatch was not yet published is handed out
-- (a retry or fallback coming due). A due entry whose dispatch was already
-- published means no worker has claimed it for in_flight_ms: if its queue is empty,
-- the message was lost (a producer or worker died before publishing, a message went
-- back to an unreachable broker), so it is handed out again; if the queue still
-- holds messages, the job may simply be waiting its turn: it is looked at again
-- after recheck_ms, or 1 ms per message in the queue if that is longer (soon, so a
-- message lost in a backlog, e.g. in the last second of writes a Redis crash takes
-- with it, is found soon after the backlog drains; not so often that a backlog of
-- 100k jobs costs Redis more than a few checks a millisecond). A second
-- message for the same dispatch is dropped by claim.lua, so this never runs a job twice.
--
-- A job that ended while no worker held a message for it (cancelled by the caller, failed
-- by the reaper past its deadline) is left here due now, only so that a worker tells
-- Celery's events, and so Flower, how it ended: it is handed out once in `ended`.
--
-- KEYS[1] delayed zset
-- ARGV[1] max jobs  ARGV[2] in_flight_ms  ARGV[3] job key prefix ("<prefix>:job:")  ARGV[4] recheck_ms
-- ARGV[5] 1 to hand out ended jobs, 0 to leave them for a caller that can send Celery's events
-- Returns {messages, ended}, two flat lists (jobs that are gone are dropped):
--   messages: job_id, dispatch, queue, label, attempt, ... to publish; label and attempt name the
--             message for Flower (contract/labels.py: the attempt it starts is attempt + 1)
--   ended:    job_id, state, error (JSON or ""), ... of jobs that ended with no message to tell it
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
local out = {}
local ended = {}
local later = now_ms + tonumber(ARGV[2])
for _, job_id in ipairs(due) do
  local job_key = ARGV[3] .. job_id
  local fields = redis.call('HMGET', job_key, 'state', 'dispatch', 'queue', 'published', 'label', 'attempt')
  local state, dispatch, queue, published = fields[1], fields[2], fields[3], fields[4]
  -- A job in a provider batch has no message to publish (worker/batches/ settles it).
  if (not state) or state == 'succeeded' or state == 'running' or state == 'in_provider_batch' then
    redis.call('ZREM', KEYS[1], job_id)
  elseif state == 'failed' or state == 'cancelled' then
    if ARGV[5] == '1' then
      redis.call('ZREM', KEYS[1], job_id)
      ended[#ended + 1] = job_id
      ended[#ended + 1] = state
      ended[#ended + 1] = redis.call('HGET', job_key, 'error') or ''
    end
  else
    local backlog = 0
    if published == dispatch then
      backlog = redis.call('LLEN', queue)
    end
    if backlog > 0 then
      redis.call('ZADD', KEYS[1], now_ms + math.max(tonumber(ARGV[4]), backlog), job_id)
    else
      redis.call('ZADD', KEYS[1], later, job_id)
      redis.call('HSET', job_key, 'published', dispatch)
      out[#out + 1] = job_id
      out[#out + 1] = dispatch
      out[#out + 1] = queue
      out[#out + 1] = fields[5] or ''
      out[#out + 1] = fields[6] or '0'
    end
  end
end
return {out, ended}
