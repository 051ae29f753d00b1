-- The circuit breaker of one provider entry. Every read-and-change is this one
-- script, on Redis's clock, so every worker and every health check sees one state.
--
--   closed --(failure_threshold consecutive failures)--> open
--   open --(cooldown passed; the next caller is the probe)--> half_open
--   half_open --(success)--> closed      half_open --(failure)--> open
--
-- KEYS[1] circuit hash (producer/keys.py `circuit(provider)`)
-- ARGV[1] op: "allow" | "success" | "failure" | "release"
-- ARGV[2] failure_threshold (consecutive failures that open the circuit)
-- ARGV[3] cooldown_ms (how long an open circuit refuses everything)
-- ARGV[4] probe_ttl_ms (how long a granted probe holds the half-open circuit; a probe
--         whose worker died frees it when this runs out)
-- ARGV[5] token of the asker: "<job_id>:<attempt>" or "health:<worker id>"
-- ARGV[6] error text (failure only; already redacted)
-- ARGV[7] source of the outcome: "job" or "health"
--
-- Hash fields (times in epoch ms): state, failures, opened_at, probe_token, probe_until,
-- times_opened, changed_at, last_error, last_error_at, last_error_source, last_success_at.
--
-- Returns
--   allow   -> {"allow"|"probe"|"deny", state, wait_ms, failures}
--   success -> {state, changed (0|1)}
--   failure -> {state, failures, changed (0|1)}
--   release -> {state, released (0|1)}
--
-- Outcomes that arrive while an open circuit cools down (calls that started before it
-- opened) change nothing: a late success must not close it early, and a late failure
-- must not stretch the cool-down forever.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op = ARGV[1]
local threshold = tonumber(ARGV[2])
local cooldown_ms = tonumber(ARGV[3])
local probe_ttl_ms = tonumber(ARGV[4])

local fields = redis.call('HMGET', KEYS[1], 'state', 'failures', 'opened_at', 'probe_token', 'probe_until')
local state = fields[1] or 'closed'
local failures = tonumber(fields[2] or '0')
local opened_at = tonumber(fields[3] or '0')
local probe_token = fields[4] or ''
local probe_until = tonumber(fields[5] or '0')
local cooling = state == 'open' and now < opened_at + cooldown_ms

if op == 'allow' then
  if state == 'closed' then
    return {'allow', 'closed', 0, failures}
  end
  if cooling then
    return {'deny', 'open', opened_at + cooldown_ms - now, failures}
  end
  if state == 'half_open' and now < probe_until then
    return {'deny', 'half_open', probe_until - now, failures}
  end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'probe_token', ARGV[5], 'probe_until', now + probe_ttl_ms,
    'changed_at', now)
  return {'probe', 'half_open', 0, failures}
end

if op == 'release' then
  -- The probe ended without a verdict (deferred, cancelled, an error that says nothing
  -- about the provider): let the next caller probe instead.
  if state == 'half_open' and probe_token == ARGV[5] then
    redis.call('HSET', KEYS[1], 'probe_token', '', 'probe_until', 0)
    return {state, 1}
  end
  return {state, 0}
end

if op == 'success' then
  redis.call('HSET', KEYS[1], 'last_success_at', now)
  if cooling then
    return {'open', 0}
  end
  if state ~= 'closed' then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'probe_token', '', 'probe_until', 0, 'changed_at', now)
    return {'closed', 1}
  end
  if failures ~= 0 then
    redis.call('HSET', KEYS[1], 'failures', 0)
  end
  return {'closed', 0}
end

if op == 'failure' then
  redis.call('HSET', KEYS[1], 'last_error', ARGV[6], 'last_error_at', now, 'last_error_source', ARGV[7])
  if cooling then
    return {'open', failures, 0}
  end
  failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
  if state ~= 'closed' or failures >= threshold then
    redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now, 'probe_token', '', 'probe_until', 0, 'changed_at', now)
    redis.call('HINCRBY', KEYS[1], 'times_opened', 1)
    return {'open', failures, 1}
  end
  return {'closed', failures, 0}
end

return redis.error_reply('unknown circuit op ' .. tostring(op))
