-- The circuit breaker of one provider entry. Every read-and-change is this one
-- script, on Redis's clock, so every worker and every health check sees one state.
--
-- It judges the provider, not one request (resilience4j's model): calls are counted
-- over a sliding window, a job that fails again counts once, and the circuit opens
-- only when the failed share of at least `minimum_calls` calls reaches `failure_rate`.
-- A few requests the provider can never answer (poison) cannot open it.
--
--   closed --(failure rate over the window)--> open
--   open --(cooldown passed)--> half_open: up to `max_probes` probes at once, each a
--          health check of the breaker's own (or a job, where the adapter has none)
--   half_open --(a probe succeeds)--> closed    half_open --(a probe fails)--> open
--
-- KEYS[1] circuit hash (keys.circuit(provider))
-- KEYS[2] failed calls: zset call id -> epoch ms of its first failure in the window
--         (keys.circuit_failures(provider))
-- KEYS[3] successful calls: hash window bucket -> count (keys.circuit_successes(provider))
-- KEYS[4] probes out: zset probe token -> epoch ms when the probe's hold ends
--         (keys.circuit_probes(provider))
-- ARGV[1] op: "allow" | "success" | "failure" | "release"
-- ARGV[2] window_ms          the sliding window calls are judged over
-- ARGV[3] minimum_calls      calls in the window before the rate is judged
-- ARGV[4] failure_rate       failed share of the calls that opens the circuit (0 < r <= 1)
-- ARGV[5] cooldown_ms        how long an open circuit refuses everything
-- ARGV[6] max_probes         probes let through at once when half open
-- ARGV[7] probe_ttl_ms       how long a granted probe holds its place (a probe whose
--                            worker died frees it when this runs out)
-- ARGV[8] token              allow/release: the asker's probe token; success/failure:
--                            the call id (a job id, so its repeated failures count once;
--                            or a unique health-check id)
-- ARGV[9] successes          success only: how many successful calls this reports (a
--                            process reports its successes in batches)
-- ARGV[10] error text        failure only (already redacted)
-- ARGV[11] source            "job", "health" or "probe"
--
-- Hash fields (times in epoch ms): state, opened_at, times_opened, changed_at,
-- last_error, last_error_at, last_error_source, last_success_at, and, as of the last
-- change, window_calls and window_failures.
--
-- Returns name/value pairs:
--   allow   -> verdict ("allow" | "probe" | "deny"), state, wait_ms
--   success -> state, changed (0|1) [, calls, failures: the window, when closed]
--   failure -> state, changed (0|1) [, calls, failures: the window, when closed]
--   release -> state, released (0|1)
--
-- Outcomes that arrive while an open circuit cools down (calls that started before it
-- opened) change nothing: a late success must not close it early, and a late failure
-- must not stretch the cool-down forever.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op = ARGV[1]
local window_ms = tonumber(ARGV[2])
local minimum_calls = tonumber(ARGV[3])
local failure_rate = tonumber(ARGV[4])
local cooldown_ms = tonumber(ARGV[5])
local max_probes = tonumber(ARGV[6])
local probe_ttl_ms = tonumber(ARGV[7])
local token = ARGV[8]
-- Twenty buckets per window: the window slides in steps of a twentieth.
local bucket_ms = math.max(1, math.floor(window_ms / 20))

local fields = redis.call('HMGET', KEYS[1], 'state', 'opened_at')
local state = fields[1] or 'closed'
local opened_at = tonumber(fields[2] or '0')
local cooling = state == 'open' and now < opened_at + cooldown_ms
local expire_ms = window_ms + cooldown_ms + 60000

-- The window's calls: failed call ids, plus the successes of the buckets still in it.
local function window()
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window_ms)
  local failures = redis.call('ZCARD', KEYS[2])
  local first_bucket = math.floor((now - window_ms) / bucket_ms) + 1
  local successes = 0
  local buckets = redis.call('HGETALL', KEYS[3])
  for index = 1, #buckets, 2 do
    if tonumber(buckets[index]) < first_bucket then
      redis.call('HDEL', KEYS[3], buckets[index])
    else
      successes = successes + tonumber(buckets[index + 1])
    end
  end
  return failures + successes, failures
end

local function set_state(new_state)
  redis.call('HSET', KEYS[1], 'state', new_state, 'changed_at', now)
  state = new_state
end

local function open()
  set_state('open')
  redis.call('HSET', KEYS[1], 'opened_at', now)
  redis.call('HINCRBY', KEYS[1], 'times_opened', 1)
  redis.call('DEL', KEYS[4])
end

local function close()
  set_state('closed')
  -- A fresh start: the outage's failures must not reopen the circuit on the next blip.
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
end

local function probes_out()
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  return redis.call('ZCARD', KEYS[4])
end

if op == 'allow' then
  if state == 'closed' then
    return {'verdict', 'allow', 'state', state, 'wait_ms', 0}
  end
  if cooling then
    return {'verdict', 'deny', 'state', state, 'wait_ms', opened_at + cooldown_ms - now}
  end
  if redis.call('ZSCORE', KEYS[4], token) then
    return {'verdict', 'probe', 'state', state, 'wait_ms', 0}
  end
  if probes_out() >= max_probes then
    local soonest = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
    return {'verdict', 'deny', 'state', state, 'wait_ms', math.max(1, tonumber(soonest[2]) - now)}
  end
  if state ~= 'half_open' then
    set_state('half_open')
  end
  redis.call('ZADD', KEYS[4], now + probe_ttl_ms, token)
  redis.call('PEXPIRE', KEYS[4], probe_ttl_ms + 1000)
  return {'verdict', 'probe', 'state', state, 'wait_ms', 0}
end

if op == 'release' then
  -- The probe ended without a verdict (deferred, cancelled, an error that says nothing
  -- about the provider): its place goes to the next caller.
  return {'state', state, 'released', redis.call('ZREM', KEYS[4], token)}
end

local is_probe = redis.call('ZREM', KEYS[4], token) == 1

if op == 'success' then
  redis.call('HSET', KEYS[1], 'last_success_at', now)
  if cooling then
    return {'state', state, 'changed', 0}
  end
  if state ~= 'closed' then
    if is_probe or ARGV[11] == 'probe' then
      close()
      return {'state', state, 'changed', 1}
    end
    return {'state', state, 'changed', 0}
  end
  local bucket = math.floor(now / bucket_ms)
  redis.call('HINCRBY', KEYS[3], bucket, tonumber(ARGV[9]))
  redis.call('PEXPIRE', KEYS[3], expire_ms)
  local calls, failures = window()
  redis.call('HSET', KEYS[1], 'window_calls', calls, 'window_failures', failures)
  return {'state', state, 'changed', 0, 'calls', calls, 'failures', failures}
end

if op == 'failure' then
  redis.call('HSET', KEYS[1], 'last_error', ARGV[10], 'last_error_at', now, 'last_error_source', ARGV[11])
  if cooling then
    return {'state', state, 'changed', 0}
  end
  if state ~= 'closed' then
    if is_probe or ARGV[11] == 'probe' then
      open()
      return {'state', state, 'changed', 1}
    end
    return {'state', state, 'changed', 0}
  end
  -- NX: a job that fails again inside the window is still one failed call.
  redis.call('ZADD', KEYS[2], 'NX', now, token)
  redis.call('PEXPIRE', KEYS[2], expire_ms)
  local calls, failures = window()
  redis.call('HSET', KEYS[1], 'window_calls', calls, 'window_failures', failures)
  if calls >= minimum_calls and failures >= failure_rate * calls then
    open()
    return {'state', state, 'changed', 1, 'calls', calls, 'failures', failures}
  end
  return {'state', state, 'changed', 0, 'calls', calls, 'failures', failures}
end

return redis.error_reply('unknown circuit op ' .. tostring(op))
