-- acquire: take one request and `tokens` from every bucket and a concurrency slot for one call,
-- or say how long to wait and which limit binds. Runs after prelude.lua.
--
-- KEYS: every `*key` field below (the prelude checks each is declared).
--
-- ARGV[1], a JSON object:
--   lease_id         the call's lease (the engine passes job id + attempt); ask again with the same
--   tokens           estimated tokens to reserve (prompt estimate + max_tokens)
--   lease_ttl_s      a slot not settled, released or renewed by then frees itself
--   retry_s          wait to answer while every concurrency slot is taken
--   waiting_since_s  epoch s the caller started waiting (0: now); the longest-waiting holds a claim
--   claim_grace_s    how late a refused caller may come back and still find its tokens held
--   line_grace_s     a caller in line not back this long past its turn is gone; it leaves the line
--   pauses[]         key: string, paused until (epoch s); one per pause that applies
--   daily_key        hash: day (UTC days since epoch) and one counter per quota field
--   quotas[]         limit (config name), field (its counter in daily_key), quota (most a day),
--                    ask (what this call adds; absent when unknown until it ends, as its cost):
--                    refused when today's count plus `ask` would pass `quota`, or without `ask`
--                    when the count has reached it
--   slots[]          limit, most (calls in flight at once; 0: no limit), key: sorted set, lease id
--                    -> lease expiry (epoch s); the call takes a slot in each
--   buckets[]        limit, per_minute, burst (capacity, in the bucket's units), cost (this call's
--                    units: 1 request, or its tokens), claims (true for token buckets: the
--                    longest-waiting caller first in line has its tokens held), key: hash (below),
--                    line_key: sorted set, lease id of a caller waiting -> its position
--   rings[]          key: usage ring hash (prelude's ring_add), counts the request and its tokens
--
-- A bucket hash holds level (units), ts (epoch s) and cap (units); its line's head and tail
-- (positions: what callers need, in units) and t:<lease id> ("position need due") for each caller
-- in line; a token bucket also holds one claim (claim_id, claim_tokens, claim_until, claim_since)
-- and reserved_avg, settled_avg, ratio_n (what settled reservations cost of themselves).
--
-- Returns: granted 1|0, wait_s (string), limit (config name, or '' when granted), at_s (Redis
-- time, string).

local EPSILON = 1e-6                -- tokens; stored levels and times are rounded to 6 decimals
local MIN_WAIT_S = 0.001           -- a refusal always asks for a real wait
local PLAN_EARLY = 0.05            -- a newcomer is told to come back this much early (share of its wait)
local RATIO_PRIOR = 0.5            -- a token bucket's `ratio` before any settle (low: back early, told again)
local LINE_FRONT = 64              -- callers at the front of a line read on each ask
local LINE_EXACT = 1000            -- callers ahead summed exactly when one is told again
local REPLAN_LATE = 0.1            -- a caller told again aims this share of `hold` past its turn
local MIN_RATIO, MAX_RATIO = 0.1, 2 -- bounds on `ratio`, which only plans the line

local lease_id = call.lease_id
local waiting_since = call.waiting_since_s
if not waiting_since or waiting_since <= 0 then waiting_since = now end

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
    if not place or place[3] + call.line_grace_s < now then
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

-- Seconds until the bucket's cost fits (0 when it fits now); when it fits, the bucket state after
-- taking it; the caller's place in line, if it has one; and its need.
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
  local key, cost, line_key = b.key, b.cost, b.line_key
  local claimant = b.claims and lease_id or nil
  local level, cap, rate = bucket_load(key, b.per_minute, b.burst, cost)
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
    return 0, {level = level - cost, cap = cap, rate = rate, claimed = ours or takeover, place = place}, place, need
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
               'claim_until', fmt(now + math.max(0, turn) + call.claim_grace_s),
               'claim_since', fmt(waiting_since))
  end
  -- Told again, a caller aims a little past its turn: a little late costs nothing (the bucket
  -- keeps its tokens), a little early one more ask.
  if place then turn = turn + hold * REPLAN_LATE end
  return math.max(MIN_WAIT_S, turn), nil, place, need
end

-- A refused caller keeps its place, or joins at the end; it is due back in `wait_s`.
local function line_wait(b, place, need, wait_s)
  local key, line_key = b.key, b.line_key
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
  local lasts = due + call.line_grace_s
  keep_until(key, lasts)
  keep_until(line_key, lasts)
end

local worst_wait, worst_limit = 0, ''
local function consider(wait_s, limit)
  if wait_s > worst_wait then worst_wait, worst_limit = wait_s, limit end
end

consider(paused_until(call.pauses) - now, 'paused')

local until_tomorrow = (today + 1) * 86400 - now
local used = daily_read(call.daily_key, call.quotas)
for _, quota in ipairs(call.quotas) do
  local count = used[quota.field]
  if (quota.ask and count + quota.ask > quota.quota) or (not quota.ask and count >= quota.quota) then
    consider(until_tomorrow, quota.limit)
  end
end

for _, slot in ipairs(call.slots) do
  redis.call('ZREMRANGEBYSCORE', slot.key, '-inf', now)
  if slot.most > 0 and not redis.call('ZSCORE', slot.key, lease_id)
      and redis.call('ZCARD', slot.key) >= slot.most then
    local first = redis.call('ZRANGE', slot.key, 0, 0, 'WITHSCORES')
    consider(math.min(tonumber(first[2]) - now, call.retry_s), slot.limit)
  end
end

local taken, places, needs = {}, {}, {}
for i, b in ipairs(call.buckets) do
  local wait_s, after, place, need = bucket_check(b)
  consider(wait_s, b.limit)
  taken[i], places[i], needs[i] = after, place, need
end

if worst_wait > 0 then
  for i, b in ipairs(call.buckets) do
    -- Callers wait in line where they are short, and keep any place they hold elsewhere.
    if places[i] or not taken[i] then line_wait(b, places[i], needs[i], worst_wait) end
  end
  return {'granted', 0, 'wait_s', fmt(worst_wait), 'limit', worst_limit, 'at_s', fmt(now)}
end

for i, after in pairs(taken) do
  local b = call.buckets[i]
  bucket_store(b.key, after.level, after.cap, after.rate)
  if after.claimed then redis.call('HDEL', b.key, 'claim_id', 'claim_tokens', 'claim_until', 'claim_since') end
  if after.place then line_leave(b.key, b.line_key, lease_id, after.place) end
end
for _, slot in ipairs(call.slots) do
  redis.call('ZADD', slot.key, fmt(now + call.lease_ttl_s), lease_id)
  zset_touch(slot.key)
end
for _, ring in ipairs(call.rings) do ring_add(ring.key, 1, call.tokens) end
return {'granted', 1, 'wait_s', fmt(0), 'limit', '', 'at_s', fmt(now)}
