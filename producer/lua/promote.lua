-- Hand out delayed jobs that are due, for the caller to publish to their queues.
-- Each handed-out job's score moves forward by in_flight_ms: if the caller dies
-- before publishing, the job comes due again then (a second message for the same
-- dispatch is dropped by claim.lua, so this never runs a job twice).
--
-- KEYS[1] delayed zset
-- ARGV[1] max jobs  ARGV[2] in_flight_ms  ARGV[3] job key prefix ("<prefix>:job:")
-- Returns a flat list: job_id, dispatch, queue, score, ... (jobs that are gone are dropped).
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
local out = {}
local later = now_ms + tonumber(ARGV[2])
for _, job_id in ipairs(due) do
  local fields = redis.call('HMGET', ARGV[3] .. job_id, 'state', 'dispatch', 'queue')
  local state = fields[1]
  if (not state) or state == 'succeeded' or state == 'failed' or state == 'cancelled' or state == 'running' then
    redis.call('ZREM', KEYS[1], job_id)
  else
    redis.call('ZADD', KEYS[1], later, job_id)
    out[#out + 1] = job_id
    out[#out + 1] = fields[2]
    out[#out + 1] = fields[3]
    out[#out + 1] = tostring(later)
  end
end
return out
