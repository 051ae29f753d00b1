-- llmq shared limiter: one atomic step per call, on Redis's clock (redis.call('TIME')).
-- worker/ratelimit.py builds the keys and arguments; its docstring explains the choices.
--
-- Operations (ARGV[1]): acquire, settle, release, renew, snapshot use the layout below;
-- penalize uses its own short layout (at the end of this header).
--
-- KEYS (acquire, settle, release, renew, snapshot):
--   KEYS[1]  pause, provider-wide        string: paused until (epoch seconds, float)
--   KEYS[2]  pause, this model           string: as KEYS[1]
--   KEYS[3]  pause, this API key scope   string: as KEYS[1] (equals KEYS[1] without key scope)
--   KEYS[4]  leases of calls in flight   sorted set: lease id -> lease expiry (epoch seconds)
--   KEYS[5]  daily usage, provider-wide  hash: day (UTC days since epoch), tokens, cost_usd
--   KEYS[6]  requests bucket             hash: level (requests), ts (epoch s), cap (requests)
--   KEYS[7]  tokens bucket               hash: level (tokens), ts (epoch s), cap (tokens), and one
--                                        claim: claim_id (lease), claim_tokens, claim_until and
--                                        claim_since (epoch s)
--   KEYS[8]  requests bucket, this model hash: as KEYS[6]
--   KEYS[9]  tokens bucket, this model   hash: as KEYS[7]
--   KEYS[10] usage ring                  hash: s<slot> second, r<slot> requests, t<slot> tokens (60 one-second slots)
--   KEYS[11] usage ring, this model      hash: as KEYS[10]
--
-- ARGV (same layout):
--   ARGV[1]  op: acquire | settle | release | renew | snapshot
--   ARGV[2]  lease id (one call's slot; the engine passes job id + attempt)
--   ARGV[3]  tokens: estimated tokens to reserve (acquire) or tokens reserved (settle)
--   ARGV[4]  lease ttl (seconds): a slot not settled or renewed by then frees itself
--   ARGV[5]  max concurrent calls in flight (0: no limit)
--   ARGV[6]  requests per minute (0: no limit)      ARGV[7]  requests burst (requests)
--   ARGV[8]  tokens per minute (0: no limit)        ARGV[9]  tokens burst (tokens)
--   ARGV[10] model requests per minute (0: none)    ARGV[11] model requests burst (requests)
--   ARGV[12] model tokens per minute (0: none)      ARGV[13] model tokens burst (tokens)
--   ARGV[14] daily tokens quota (0: none)           ARGV[15] daily cost quota (USD, 0: none)
--   ARGV[16] retry after (seconds) to answer while every concurrency slot is taken
--   ARGV[17] actual tokens (settle)                 ARGV[18] cost (USD, settle)
--   ARGV[19] tokens the per-minute buckets settle to (settle): what the provider counted
--   ARGV[20] claim grace (seconds): how late a refused caller may come back and still find
--            the tokens it waits for held for it (acquire)
--   ARGV[21] waiting since (epoch seconds; 0: now): the longest-waiting refused caller holds
--            the token buckets' claim (acquire)
--
-- Returns:
--   acquire  {granted 1|0, wait seconds (string), limit name or '', Redis time (string)}
--   settle, release, renew  1 when the lease was still held, else 0
--   snapshot {now, paused until, in flight, requests last 60 s, tokens last 60 s,
--             model requests last 60 s, model tokens last 60 s, daily tokens, daily cost USD}
--
-- penalize: KEYS[1] the pause key; ARGV[1] 'penalize', ARGV[2] pause (seconds).
--   Pauses until max(current pause, now + ARGV[2]); returns the pause end (string).
--
-- Floats go back to Python as strings: Redis turns Lua numbers into integers.

local RATE_MARGIN = 0.005          -- refill 0.5% slower than the limit: room for clock and network jitter
local MAX_CAPACITY_FRACTION = 0.5  -- a token bucket grows to fit one reservation, up to half a minute's tokens
local EPSILON = 1e-6                -- tokens; stored levels and times are rounded to 6 decimals
local MIN_WAIT_S = 0.001           -- a refusal always asks for a real wait

-- Redis < 5 replicates scripts verbatim and refuses writes after TIME; this switches to
-- replicating the writes (a no-op from Redis 5 on).
if redis.replicate_commands then redis.replicate_commands() end

local op = ARGV[1]
local clock = redis.call('TIME')
local now_s = tonumber(clock[1])
local now = now_s + tonumber(clock[2]) / 1000000

local function fmt(x) return string.format('%.6f', x) end

-- When the caller started waiting (acquire; 0 or absent: now). Decides who holds a claim.
local waiting_since = tonumber(ARGV[21] or '0') or 0
if waiting_since <= 0 then waiting_since = now end

if op == 'penalize' then
  local pause_end = now + tonumber(ARGV[2])
  local current = tonumber(redis.call('GET', KEYS[1]))
  if current and current > pause_end then return fmt(current) end
  redis.call('SET', KEYS[1], fmt(pause_end), 'PX', math.ceil((pause_end - now) * 1000) + 1)
  return fmt(pause_end)
end

-- Token bucket with continuous refill. Capacity `cap` and refill `rate` obey
-- cap + 60 * rate < per_minute + 1, so no closed 60 s window grants more than per_minute
-- whole units. A token bucket grows (while its key lives) to fit the largest reservation
-- seen, lowering its rate to keep that bound.
local function bucket_params(per_minute, base_cap, stored_cap, cost)
  local max_cap = math.max(base_cap, math.floor(per_minute * MAX_CAPACITY_FRACTION))
  local cap = math.max(base_cap, stored_cap or 0, math.min(cost, max_cap))
  local rate = (per_minute - cap + 1) * (1 - RATE_MARGIN) / 60
  return cap, rate
end

local function bucket_load(key, per_minute, base_cap, cost)
  local v = redis.call('HMGET', key, 'level', 'ts', 'cap')
  local cap, rate = bucket_params(per_minute, base_cap, tonumber(v[3]), cost)
  local level = cap
  if v[1] then
    level = math.min(cap, tonumber(v[1]) + math.max(0, now - tonumber(v[2])) * rate)
  end
  return level, cap, rate
end

-- The key outlives the moment the bucket is full by 60 s, so a grown capacity (and its
-- lower rate) is only forgotten after a whole idle minute.
local function bucket_store(key, level, cap, rate)
  redis.call('HSET', key, 'level', fmt(level), 'ts', fmt(now), 'cap', cap)
  redis.call('PEXPIRE', key, math.ceil(math.max(0, cap - level) / rate * 1000) + 60000)
end

-- Seconds until `cost` fits (0 when it fits now) and the bucket state after taking it.
-- A token bucket keeps one claim, for the caller that has waited longest among those it
-- refused: the tokens that caller waits for are held back from everyone else until it
-- returns (or its wait plus the claim grace passes). Without it, small requests, which
-- fit sooner and come back sooner, would starve a large one.
local function bucket_check(key, per_minute, base_cap, cost, claimant)
  local level, cap, rate = bucket_load(key, per_minute, base_cap, cost)
  local need = math.min(cost, cap)
  local held, ours, free, takeover = 0, false, true, false
  if claimant then
    local claim = redis.call('HMGET', key, 'claim_id', 'claim_tokens', 'claim_until', 'claim_since')
    ours = claim[1] == claimant
    free = not claim[1] or tonumber(claim[3]) <= now
    if not free and not ours then
      takeover = waiting_since < (tonumber(claim[4]) or now)
      if not takeover then held = tonumber(claim[2]) end
    end
  end
  if level - held + EPSILON >= need then return 0, {level - cost, cap, rate, ours or takeover} end
  if claimant and (free or ours or takeover) then
    redis.call('HSET', key, 'cap', cap, 'claim_id', claimant, 'claim_tokens', need,
               'claim_until', fmt(now + (need - level) / rate + tonumber(ARGV[20])),
               'claim_since', fmt(waiting_since))
  end
  return math.max(MIN_WAIT_S, (need + held - level) / rate), nil
end

local function bucket_adjust(key, per_minute, base_cap, delta)
  if per_minute <= 0 or delta == 0 then return end
  local level, cap, rate = bucket_load(key, per_minute, base_cap, 0)
  bucket_store(key, math.min(cap, level - delta), cap, rate)
end

local function ring_add(key, requests, tokens)
  local slot = now_s % 60
  if tonumber(redis.call('HGET', key, 's' .. slot)) ~= now_s then
    redis.call('HSET', key, 's' .. slot, now_s, 'r' .. slot, 0, 't' .. slot, 0)
  end
  if requests ~= 0 then redis.call('HINCRBY', key, 'r' .. slot, requests) end
  if tokens ~= 0 then redis.call('HINCRBY', key, 't' .. slot, tokens) end
  redis.call('EXPIRE', key, 120)
end

local function ring_sum(key)
  local flat = redis.call('HGETALL', key)
  local fields = {}
  for i = 1, #flat, 2 do fields[flat[i]] = tonumber(flat[i + 1]) end
  local requests, tokens = 0, 0
  for slot = 0, 59 do
    local second = fields['s' .. slot]
    if second and second > now_s - 60 then
      requests = requests + (fields['r' .. slot] or 0)
      tokens = tokens + (fields['t' .. slot] or 0)
    end
  end
  return math.max(0, requests), math.max(0, tokens)
end

local today = math.floor(now_s / 86400)

local function daily_read()
  local v = redis.call('HMGET', KEYS[5], 'day', 'tokens', 'cost_usd')
  if tonumber(v[1]) ~= today then return 0, 0 end
  return tonumber(v[2]) or 0, tonumber(v[3]) or 0
end

local function daily_add(tokens, cost_usd)
  if tonumber(redis.call('HGET', KEYS[5], 'day')) ~= today then
    redis.call('HSET', KEYS[5], 'day', today, 'tokens', 0, 'cost_usd', 0)
  end
  if tokens ~= 0 then redis.call('HINCRBY', KEYS[5], 'tokens', tokens) end
  if cost_usd ~= 0 then redis.call('HINCRBYFLOAT', KEYS[5], 'cost_usd', fmt(cost_usd)) end
  redis.call('EXPIRE', KEYS[5], 2 * 86400)
end

local function paused_until()
  local latest = 0
  for i = 1, 3 do
    local v = tonumber(redis.call('GET', KEYS[i]))
    if v and v > latest then latest = v end
  end
  return latest
end

local function lease_drop(lease_id)
  return redis.call('ZREM', KEYS[4], lease_id)
end

local function leases_touch()
  local last = redis.call('ZRANGE', KEYS[4], -1, -1, 'WITHSCORES')
  if last[2] then redis.call('PEXPIREAT', KEYS[4], math.ceil(tonumber(last[2]) * 1000) + 1000) end
end

local lease_id = ARGV[2]
local tokens = tonumber(ARGV[3])

if op == 'acquire' then
  local max_concurrent = tonumber(ARGV[5])
  local worst_wait, worst_limit = 0, ''
  local function consider(wait, name)
    if wait > worst_wait then worst_wait, worst_limit = wait, name end
  end

  consider(paused_until() - now, 'paused')

  local until_tomorrow = (today + 1) * 86400 - now
  local used_tokens, used_cost = daily_read()
  local daily_tokens, daily_cost = tonumber(ARGV[14]), tonumber(ARGV[15])
  if daily_tokens > 0 and used_tokens + tokens > daily_tokens then consider(until_tomorrow, 'daily_tokens') end
  if daily_cost > 0 and used_cost >= daily_cost then consider(until_tomorrow, 'daily_cost_usd') end

  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  if max_concurrent > 0 and not redis.call('ZSCORE', KEYS[4], lease_id)
      and redis.call('ZCARD', KEYS[4]) >= max_concurrent then
    local first = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
    consider(math.min(tonumber(first[2]) - now, tonumber(ARGV[16])), 'max_concurrent')
  end

  local buckets = {
    {KEYS[6], tonumber(ARGV[6]), tonumber(ARGV[7]), 1, 'requests_per_minute', nil},
    {KEYS[7], tonumber(ARGV[8]), tonumber(ARGV[9]), tokens, 'tokens_per_minute', lease_id},
    {KEYS[8], tonumber(ARGV[10]), tonumber(ARGV[11]), 1, 'per_model.requests_per_minute', nil},
    {KEYS[9], tonumber(ARGV[12]), tonumber(ARGV[13]), tokens, 'per_model.tokens_per_minute', lease_id},
  }
  local taken = {}
  for i, b in ipairs(buckets) do
    if b[2] > 0 then
      local wait, after = bucket_check(b[1], b[2], b[3], b[4], b[6])
      consider(wait, b[5])
      taken[i] = after
    end
  end

  if worst_wait > 0 then return {0, fmt(worst_wait), worst_limit, fmt(now)} end

  for i, after in pairs(taken) do
    bucket_store(buckets[i][1], after[1], after[2], after[3])
    if after[4] then redis.call('HDEL', buckets[i][1], 'claim_id', 'claim_tokens', 'claim_until', 'claim_since') end
  end
  redis.call('ZADD', KEYS[4], fmt(now + tonumber(ARGV[4])), lease_id)
  leases_touch()
  ring_add(KEYS[10], 1, tokens)
  ring_add(KEYS[11], 1, tokens)
  return {1, fmt(0), '', fmt(now)}
end

if op == 'settle' then
  local actual = tonumber(ARGV[17])
  local delta = tonumber(ARGV[19]) - tokens
  bucket_adjust(KEYS[7], tonumber(ARGV[8]), tonumber(ARGV[9]), delta)
  bucket_adjust(KEYS[9], tonumber(ARGV[12]), tonumber(ARGV[13]), delta)
  if delta ~= 0 then
    ring_add(KEYS[10], 0, delta)
    ring_add(KEYS[11], 0, delta)
  end
  daily_add(actual, tonumber(ARGV[18]))
  return lease_drop(lease_id)
end

if op == 'release' then
  return lease_drop(lease_id)
end

if op == 'renew' then
  if not redis.call('ZSCORE', KEYS[4], lease_id) then return 0 end
  redis.call('ZADD', KEYS[4], fmt(now + tonumber(ARGV[4])), lease_id)
  leases_touch()
  return 1
end

if op == 'snapshot' then
  local requests, used = ring_sum(KEYS[10])
  local model_requests, model_tokens = ring_sum(KEYS[11])
  local daily_tokens, daily_cost = daily_read()
  local in_flight = redis.call('ZCOUNT', KEYS[4], '(' .. fmt(now), '+inf')
  return {fmt(now), fmt(paused_until()), in_flight, requests, used, model_requests, model_tokens,
          daily_tokens, fmt(daily_cost)}
end

return redis.error_reply('llmq ratelimit: unknown op ' .. tostring(op))
