-- Daily spend of one caller and one provider entry, in whole micro-USD, per UTC day
-- on Redis's clock (so every worker agrees where a day ends).
--
-- KEYS[1] caller counter base ('' when the job has no caller)   (producer/contract/keys.py budget_spend)
-- KEYS[2] provider counter base
-- ARGV[1] op: "check" | "add"
-- ARGV[2] micro-USD to add (add only)
-- ARGV[3] counter ttl_s (add only): counters outlive their day, then vanish
--
-- The counter of a day is <base>:<UTC day number> (days since the epoch). These keys
-- are derived here from the declared bases, so a caller and a provider always read
-- and write the same day; llmq runs on one Redis (the Celery broker), not a cluster.
--
-- Returns check -> {caller_spent, provider_spent, seconds_until_next_utc_day}
--         add   -> {caller_spent, provider_spent}
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local day = math.floor(now_s / 86400)
local caller_key = KEYS[1] ~= '' and (KEYS[1] .. ':' .. day) or nil
local provider_key = KEYS[2] .. ':' .. day

if ARGV[1] == 'add' then
  local amount = tonumber(ARGV[2])
  local ttl_s = tonumber(ARGV[3])
  local caller_spent = 0
  if caller_key then
    caller_spent = redis.call('INCRBY', caller_key, amount)
    redis.call('EXPIRE', caller_key, ttl_s)
  end
  local provider_spent = redis.call('INCRBY', provider_key, amount)
  redis.call('EXPIRE', provider_key, ttl_s)
  return {caller_spent, provider_spent}
end

local caller_spent = 0
if caller_key then
  caller_spent = tonumber(redis.call('GET', caller_key) or '0')
end
local provider_spent = tonumber(redis.call('GET', provider_key) or '0')
return {caller_spent, provider_spent, (day + 1) * 86400 - now_s}
