-- The HTTP front's per-caller (per-key) limits, in one atomic step on Redis's clock:
-- requests per minute as a GCRA token bucket, and today's spend against a daily USD budget.
-- worker/limiter/callers.py calls it; its docstring explains the choices.
--
-- KEYS[1]  the caller's request bucket        string: theoretical arrival time (epoch s, float)
--          ('' when the caller has no requests/min limit)
-- KEYS[2]  the caller's daily spend base       (producer/contract/keys.py budget_spend("caller", name));
--          the day's counter is <base>:<UTC day number>, micro-USD, written by the worker's
--          budget middleware (worker/middleware/lua/budget.lua); '' when the caller has no budget
--
-- ARGV[1]  requests per minute (0: no limit)
-- ARGV[2]  burst (requests let through at once, >= 1)
-- ARGV[3]  daily budget in micro-USD (-1: no budget)
--
-- Returns {allowed (0|1), retry_after_s (string float), binding limit ('' | 'requests_per_minute' | 'daily_usd')}.
-- The budget is read first and a refused call takes no request from the bucket.
local t = redis.call('TIME')
local now_s = tonumber(t[1]) + tonumber(t[2]) / 1e6

local budget = tonumber(ARGV[3])
if KEYS[2] ~= '' and budget >= 0 then
  local day = math.floor(now_s / 86400)
  local spent = tonumber(redis.call('GET', KEYS[2] .. ':' .. day) or '0')
  if spent >= budget then
    return {0, tostring((day + 1) * 86400 - now_s), 'daily_usd'}
  end
end

local rpm = tonumber(ARGV[1])
if KEYS[1] == '' or rpm <= 0 then
  return {1, '0', ''}
end
local interval_s = 60.0 / rpm
local burst = math.max(1, tonumber(ARGV[2]))
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now_s then
  tat = now_s
end
-- GCRA: a request is allowed while the theoretical arrival time is within burst intervals of now.
local allow_at = tat - (burst - 1) * interval_s
if allow_at > now_s then
  return {0, tostring(allow_at - now_s), 'requests_per_minute'}
end
tat = tat + interval_s
redis.call('SET', KEYS[1], tostring(tat), 'PX', math.ceil((tat - now_s) * 1000) + 1000)
return {1, '0', ''}
