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
--   KEYS[12..15] the lines of KEYS[6..9] sorted set: lease id of a caller waiting -> its position
--   Each bucket hash also keeps its line's head and tail (positions: what callers need, in requests
--   or tokens) and t:<lease id> ("position need due") for each caller in line; token buckets keep
--   reserved_avg, settled_avg and ratio_n (what settled reservations cost of themselves).
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
--   ARGV[22] line grace (seconds): a caller in line that is not back this long past its turn
--            never comes back; it leaves the line (acquire)
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
local RATIO_WEIGHT = 0.05          -- each settle moves a token bucket's `ratio` at least this far toward its own
local PLAN_EARLY = 0.05            -- a newcomer is told to come back this much early (share of its wait)
local RATIO_PRIOR = 0.5            -- a token bucket's `ratio` before any settle (low: back early, told again)
local LINE_FRONT = 64              -- callers at the front of a line read on each ask
local LINE_EXACT = 1000            -- callers ahead summed exactly when one is told again
local REPLAN_LATE = 0.1            -- a caller told again aims this share of `hold` past its turn
local MIN_RATIO, MAX_RATIO = 0.1, 2 -- bounds on `ratio`, which only plans the line

-- Redis < 5 replicates scripts verbatim and refuses writes after TIME; this switches to
-- replicating the writes (a no-op from Redis 5 on).
if redis.replicate_commands then redis.replicate_commands() end

local op = ARGV[1]
local lease_id = ARGV[2]
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

-- Keep `key` at least until `until_s` (epoch s) and a minute more, never cutting a longer
-- expiry short: places in a bucket's line may outlive the bucket's own need.
local function keep_until(key, until_s)
  local wanted = math.ceil((until_s - now) * 1000) + 60000
  if redis.call('PTTL', key) < wanted then redis.call('PEXPIRE', key, wanted) end
end

-- A sorted set scored by expiry lives until its last member expires.
local function zset_touch(key)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then redis.call('PEXPIRE', key, math.ceil((tonumber(last[2]) - now) * 1000) + 1000) end
end

-- The key outlives the moment the bucket is full by 60 s, so a grown capacity (and its
-- lower rate) is only forgotten after a whole idle minute.
local function bucket_store(key, level, cap, rate)
  redis.call('HSET', key, 'level', fmt(level), 'ts', fmt(now), 'cap', cap)
  keep_until(key, now + math.max(0, cap - level) / rate)
end

-- A caller's place in a bucket's line, from `t:<lease id>`: {position, need, due}. The line's
-- sorted set orders callers by position (what those before them needed, counted as they joined);
-- due is a caller's turn as planned (epoch s); `tail` less `head` is what everyone in line needs.
local function place_read(entry)
  if not entry then return nil end
  local position, need, due = string.match(entry, '^(%S+) (%S+) (%S+)$')
  return {tonumber(position), tonumber(need), tonumber(due)}
end

local function field_add(key, field, delta)
  redis.call('HSET', key, field, fmt((tonumber(redis.call('HGET', key, field)) or 0) + delta))
end

local function line_leave(key, line_key, id, place)
  redis.call('ZREM', line_key, id)
  redis.call('HDEL', key, 't:' .. id)
  field_add(key, 'head', place and place[2] or 0)
end

-- The first callers in line: {id, place} for up to LINE_FRONT of them. Those more than the
-- line grace past their turn never came back (cancelled, past their deadline, gone to another
-- provider): they leave the line.
local function line_front(key, line_key)
  local ids = redis.call('ZRANGE', line_key, 0, LINE_FRONT - 1)
  if #ids == 0 then return {} end
  local fields = {}
  for i, id in ipairs(ids) do fields[i] = 't:' .. id end
  local front = {}
  for i, entry in ipairs(redis.call('HMGET', key, unpack(fields))) do
    local place = place_read(entry)
    if not place or place[3] + tonumber(ARGV[22]) < now then
      line_leave(key, line_key, ids[i], place)
    else
      front[#front + 1] = {ids[i], place}
    end
  end
  return front
end

-- What the callers ahead of `position` need: summed for the first LINE_EXACT of them, the rest
-- counted at the line's average (`waiting`: what everyone in line needs).
local function line_ahead(key, line_key, position, waiting)
  local ids = redis.call('ZRANGEBYSCORE', line_key, '-inf', '(' .. fmt(position), 'LIMIT', 0, LINE_EXACT)
  if #ids == 0 then return 0 end
  local fields = {}
  for i, id in ipairs(ids) do fields[i] = 't:' .. id end
  local ahead = 0
  for _, entry in ipairs(redis.call('HMGET', key, unpack(fields))) do
    local place = place_read(entry)
    if place then ahead = ahead + place[2] end
  end
  if #ids == LINE_EXACT then
    local rest = redis.call('ZCOUNT', line_key, '-inf', '(' .. fmt(position)) - LINE_EXACT
    ahead = ahead + rest * waiting / math.max(1, redis.call('ZCARD', line_key))
  end
  return ahead
end

-- Seconds until `cost` fits (0 when it fits now); when it fits, the bucket state after taking
-- it; the caller's place in line, if it has one; and its need.
--
-- The line. Told only "come back when one call would fit", every refused call would come back at
-- once and all but one be refused again. So each bucket keeps a line, first come, first served.
-- A refused newcomer joins at the end; it is told to come back when the refill will have covered
-- what everyone ahead of it needs and its own need; it keeps its place until served, and back
-- too early, it is told again from its place, a little past its turn (`REPLAN_LATE`: late costs
-- nothing, early one more ask). The bucket keeps what callers ahead need, but for callers more
-- than the burst's worth of seconds (`hold`) past their turn, and never more than half the
-- bucket: tokens no one comes for go to whoever is there rather than overflow (a queue of
-- messages in the broker, or a busy worker, delays callers), with room left for settles'
-- refunds. The plan: token buckets count reservations at what they end up costing (`ratio`:
-- settling returns a high estimate's excess; `RATIO_PRIOR` before any settle), and a newcomer's
-- plan errs early (`PLAN_EARLY`): told too late, the refill would overflow while nobody asks.
-- The line decides who goes first and when callers come back; what is granted is the bucket's
-- alone.
--
-- The claim. A token bucket keeps one claim, for the caller first in line (no one ahead of it)
-- that has waited longest: the tokens it waits for are held back from everyone else until it
-- returns (or its wait plus the claim grace passes). Without it, small requests, which fit
-- sooner, would starve a large one.
local function bucket_check(b)
  local key, per_minute, base_cap, cost, claimant, line_key = b[1], b[2], b[3], b[4], b[6], b[7]
  local level, cap, rate = bucket_load(key, per_minute, base_cap, cost)
  local need = math.min(cost, cap)
  local hold = cap / rate
  local front = line_front(key, line_key)
  local s = redis.call('HMGET', key, 'head', 'tail', 'reserved_avg', 'settled_avg', 't:' .. lease_id,
                       'claim_id', 'claim_tokens', 'claim_until', 'claim_since')
  local head, tail = tonumber(s[1]) or 0, tonumber(s[2]) or 0
  local place = place_read(s[5])
  local held, ours, free, takeover = 0, false, true, false
  if claimant then
    ours = s[6] == claimant
    free = not s[6] or tonumber(s[8]) <= now
    if not free and not ours then
      takeover = waiting_since < (tonumber(s[9]) or now)
      if not takeover then held = tonumber(s[7]) end
    end
  end
  local position = place and place[1] or tail
  local kept = 0  -- for callers ahead, but those later than `hold` past their turn
  for _, entry in ipairs(front) do
    local other = entry[2]
    if other[1] < position and other[3] >= now - hold then kept = kept + other[2] end
  end
  kept = math.min(kept, cap / 2)
  if level - held + EPSILON >= need + kept then
    return 0, {level - cost, cap, rate, ours or takeover, place}, place, need
  end
  local ahead = tail - head  -- a newcomer: behind everyone
  if place then ahead = line_ahead(key, line_key, position, tail - head) end
  local ratio = 1  -- requests; tokens before any settle, for a caller told again
  if claimant and tonumber(s[3]) then
    ratio = math.max(MIN_RATIO, math.min(MAX_RATIO, tonumber(s[4]) / tonumber(s[3])))
  elseif claimant and not place then
    ratio = RATIO_PRIOR
  end
  if not place then ratio = ratio * (1 - PLAN_EARLY) end
  local first = ahead <= EPSILON
  local turn = (math.max(ahead * ratio, kept) + need - level + (first and held or 0)) / rate
  if claimant and first and (free or ours or takeover) then
    redis.call('HSET', key, 'cap', cap, 'claim_id', claimant, 'claim_tokens', need,
               'claim_until', fmt(now + math.max(0, turn) + tonumber(ARGV[20])),
               'claim_since', fmt(waiting_since))
  end
  -- Told again, a caller aims a little past its turn: a little late costs nothing (the bucket
  -- keeps its tokens), a little early one more ask.
  if place then turn = turn + hold * REPLAN_LATE end
  return math.max(MIN_WAIT_S, turn), nil, place, need
end

-- A refused caller keeps its place, or joins at the end; it is due back in `wait_s`.
local function line_wait(b, place, need, wait_s)
  local key, line_key = b[1], b[7]
  local position
  if place then
    position, need = place[1], place[2]
  else
    position = tonumber(redis.call('HGET', key, 'tail')) or 0
    redis.call('HSET', key, 'tail', fmt(position + need))
    redis.call('ZADD', line_key, fmt(position), lease_id)
  end
  local due = now + wait_s
  redis.call('HSET', key, 't:' .. lease_id, fmt(position) .. ' ' .. fmt(need) .. ' ' .. fmt(due))
  local lasts = due + tonumber(ARGV[22])
  keep_until(key, lasts)
  keep_until(line_key, lasts)
end

-- Settle: count what the provider counted (`delta` more than reserved) and learn what
-- reservations cost of themselves, for planning the line.
local function bucket_adjust(key, per_minute, base_cap, delta, reserved)
  if per_minute <= 0 then return end
  local level, cap, rate = bucket_load(key, per_minute, base_cap, 0)
  bucket_store(key, math.min(cap, level - delta), cap, rate)
  if reserved > 0 then  -- moving averages of what was reserved and what it settled to
    local v = redis.call('HMGET', key, 'reserved_avg', 'settled_avg', 'ratio_n')
    local n = tonumber(v[3]) or 0
    local weight = math.max(RATIO_WEIGHT, 1 / (n + 1))
    local reserved_avg = (tonumber(v[1]) or 0) * (1 - weight) + reserved * weight
    local settled_avg = (tonumber(v[2]) or 0) * (1 - weight) + (reserved + delta) * weight
    redis.call('HSET', key, 'reserved_avg', fmt(reserved_avg), 'settled_avg', fmt(settled_avg), 'ratio_n', n + 1)
  end
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

  local buckets = {  -- key, per minute, burst, cost, limit name, claimant (token buckets), its line
    {KEYS[6], tonumber(ARGV[6]), tonumber(ARGV[7]), 1, 'requests_per_minute', nil, KEYS[12]},
    {KEYS[7], tonumber(ARGV[8]), tonumber(ARGV[9]), tokens, 'tokens_per_minute', lease_id, KEYS[13]},
    {KEYS[8], tonumber(ARGV[10]), tonumber(ARGV[11]), 1, 'per_model.requests_per_minute', nil, KEYS[14]},
    {KEYS[9], tonumber(ARGV[12]), tonumber(ARGV[13]), tokens, 'per_model.tokens_per_minute', lease_id, KEYS[15]},
  }
  local taken, places, needs = {}, {}, {}
  for i, b in ipairs(buckets) do
    if b[2] > 0 then
      local wait, after, place, need = bucket_check(b)
      consider(wait, b[5])
      taken[i], places[i], needs[i] = after, place, need
    end
  end

  if worst_wait > 0 then
    for i, b in ipairs(buckets) do
      -- Callers wait in line where they are short, and keep any place they hold elsewhere.
      if b[2] > 0 and (places[i] or not taken[i]) then line_wait(b, places[i], needs[i], worst_wait) end
    end
    return {0, fmt(worst_wait), worst_limit, fmt(now)}
  end

  for i, after in pairs(taken) do
    local key = buckets[i][1]
    bucket_store(key, after[1], after[2], after[3])
    if after[4] then redis.call('HDEL', key, 'claim_id', 'claim_tokens', 'claim_until', 'claim_since') end
    if after[5] then line_leave(key, buckets[i][7], lease_id, after[5]) end
  end
  redis.call('ZADD', KEYS[4], fmt(now + tonumber(ARGV[4])), lease_id)
  zset_touch(KEYS[4])
  ring_add(KEYS[10], 1, tokens)
  ring_add(KEYS[11], 1, tokens)
  return {1, fmt(0), '', fmt(now)}
end

if op == 'settle' then
  local actual = tonumber(ARGV[17])
  local delta = tonumber(ARGV[19]) - tokens
  bucket_adjust(KEYS[7], tonumber(ARGV[8]), tonumber(ARGV[9]), delta, tokens)
  bucket_adjust(KEYS[9], tonumber(ARGV[12]), tonumber(ARGV[13]), delta, tokens)
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
  zset_touch(KEYS[4])
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
