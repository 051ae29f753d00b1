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
--   lane             'interactive' or 'batch' (absent: batch): interactive callers wait in a line of
--                    their own that goes first (below)
--   flow, weight     a batch caller's flow (who shares the batch lane fairly: its caller or batch)
--                    and the flow's weight (> 0); absent: the flow of every caller naming none, 1
--   probe            true: answer as if asking, and change nothing (no grant, no place in a line,
--                    no claim); `granted` 1 then means "would be granted now". Pools rank their
--                    members by it
--   join             false: grant if it fits, else answer without taking a place or a claim (a
--                    pool's job trying another member while it keeps its place in this one's line)
--   pauses[]         key: string, paused until (epoch s); one per pause that applies
--   daily_key        hash: day (UTC days since epoch) and one counter per quota field
--   quotas[]         limit (config name), field (its counter in daily_key), quota (most a day),
--                    ask (what this call adds; absent when unknown until it ends, as its cost):
--                    refused when today's count plus `ask` would pass `quota`, or without `ask`
--                    when the count has reached it
--   slots[]          limit, most (calls in flight at once; 0: no limit), key: sorted set, lease id
--                    -> lease expiry (epoch s); the call takes a slot in each
--   buckets[]        limit, per_minute, burst (capacity, in the bucket's units), minute_window
--                    (prelude's bucket_params), cost (this call's units: 1 request, or its tokens),
--                    claims (true for token buckets: the longest-waiting caller first in line has
--                    its tokens held), key: hash (below), interactive_line_key and batch_line_key:
--                    sorted sets, lease id of a caller waiting -> its position, flows_key: sorted
--                    set, batch flow -> its finish tag
--   rings[]          key: usage ring hash (prelude's ring_add), counts the request and its tokens
--
-- A bucket hash holds level (units), ts (epoch s) and cap (units); what the callers in each line
-- need (in units: the batch line's head and tail, the interactive line's ihead and itail: what
-- joined less what left), the batch lane's virtual time vtime, and t:<lease id> ("position need
-- due") for each caller in line; a token bucket also holds one claim (claim_id, claim_tokens,
-- claim_until, claim_since, claim_lane) and reserved_avg, settled_avg, ratio_n (what settled
-- reservations cost of themselves).
--
-- Returns: granted 1|0, wait_s (string), limit (config name, or '' when granted), at_s (Redis
-- time, string); when granted, also spare (the share of the tightest bucket still full after the
-- grant: refill nobody came for); with probe, also room (the share of the tightest bucket left after
-- this caller's need and what is kept for callers ahead; below 0 when refused), in_flight (calls
-- holding a slot) and placed (1 when the caller holds a place in a line here).

local EPSILON = 1e-6                -- tokens; stored levels and times are rounded to 6 decimals
local MIN_WAIT_S = 0.001           -- a refusal always asks for a real wait
local PLAN_EARLY = 0.15            -- a newcomer is told to come back this much early (share of its wait)
local RATIO_PRIOR = 0.5            -- a token bucket's `ratio` for newcomers until settles have taught it
local RATIO_SETTLED = 20           -- ... this many (low: back early, told again; the first few settles vary)
local LINE_FRONT = 64              -- callers at the front of a line read on each ask
local LINE_EXACT = 1000            -- callers ahead summed exactly when one is told again
local REPLAN_LATE = 0              -- a caller told again aims this share of `hold` past its turn
local MIN_RATIO, MAX_RATIO = 0.1, 2 -- bounds on `ratio`, which only plans the line

local lease_id = call.lease_id
local waiting_since = call.waiting_since_s
if not waiting_since or waiting_since <= 0 then waiting_since = now end
local interactive = call.lane == 'interactive'
local flow = call.flow or ''  -- callers naming no flow share one: first come, first served
local weight = (call.weight and call.weight > 0) and call.weight or 1
local probe = call.probe == true
local join = call.join ~= false and not probe  -- false: granted, or refused without a place or a claim

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

-- The two lines of a bucket: each its sorted set and the field counting what left it.
local INTERACTIVE, BATCH = {head = 'ihead', tail = 'itail'}, {head = 'head', tail = 'tail'}

local function line_leave(key, line_key, line, id, place)
  redis.call('ZREM', line_key, id)
  redis.call('HDEL', key, 't:' .. id)
  field_add(key, line.head, place and place[2] or 0)
end

-- The first callers in a line: {id, place} for up to LINE_FRONT of them. Those more than the
-- line grace past their turn never came back (cancelled, past their deadline, gone to another
-- provider): they leave the line.
local function line_front(key, line_key, line)
  local ids = redis.call('ZRANGE', line_key, 0, LINE_FRONT - 1)
  if #ids == 0 then return {} end
  local fields = {}
  for i, id in ipairs(ids) do fields[i] = 't:' .. id end
  local front = {}
  for i, entry in ipairs(redis.call('HMGET', key, unpack(fields))) do
    local place = place_read(entry)
    if not place or place[3] + call.line_grace_s < now then
      line_leave(key, line_key, line, ids[i], place)
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

-- A batch newcomer's position: its flow's start tag in the batch lane's weighted fair queue
-- (start-time fair queueing). Each flow's finish tag advances by need / weight with each call it
-- joins with or is granted; a flow with nothing waiting starts from the lane's virtual time (the
-- tag last served), so one that was idle gets no credit, and one with a backlog cannot push a
-- newcomer behind it.
local function batch_tag(b, vtime)
  if not vtime then  -- a bucket new, or forgotten after a minute idle: so are its flows
    redis.call('DEL', b.flows_key)
    return 0
  end
  local finish = tonumber(redis.call('ZSCORE', b.flows_key, flow)) or 0
  return math.max(vtime, finish)
end

local function flow_advance(b, tag, need)
  redis.call('ZADD', b.flows_key, fmt(tag + need / weight), flow)
end

-- Seconds until the bucket's cost fits (0 when it fits now); when it fits, the bucket state after
-- taking it; the caller's place in line, if it has one; its need; and its room.
--
-- The line. Told only "come back when one call would fit", every refused call would come back at
-- once and all but one be refused again. So each bucket keeps a line. A refused newcomer joins
-- it; it is told to come back when the refill will have covered what everyone ahead of it needs
-- and its own need; it keeps its place until served, and back too early, it is told again from
-- its place, a little past its turn (`REPLAN_LATE`: late costs nothing, early one more ask). The
-- bucket keeps what callers ahead need, but for callers more than the burst's worth of seconds
-- (`hold`) past their turn, and never more than half the bucket: tokens no one comes for go to
-- whoever is there rather than overflow (a queue of messages in the broker, or a busy worker,
-- delays callers), with room left for settles' refunds. The plan: token buckets count
-- reservations at what they end up costing (`ratio`: settling returns a high estimate's excess;
-- `RATIO_PRIOR` for newcomers before `RATIO_SETTLED` settles), and a newcomer's plan errs early
-- (`PLAN_EARLY`): told too
-- late, the refill would overflow while nobody asks. The line decides who goes first and when
-- callers come back; what is granted is the bucket's alone.
--
-- Lanes. There are two lines. Interactive callers wait in their own, first come, first served,
-- and see only each other: every interactive caller waiting is ahead of every batch caller, so
-- an interactive call overtakes the whole batch line. Batch callers wait in a weighted fair
-- queue (`batch_tag`): their positions are start tags, so each flow gets its weight's share of
-- what the interactive lane leaves, and a small batch is not stuck behind a huge one submitted
-- earlier.
--
-- The claim. A token bucket keeps one claim, for the caller first in line (no one ahead of it)
-- that has waited longest: the tokens it waits for are held back from everyone else until it
-- returns (or its wait plus the claim grace passes). Without it, small requests, which fit
-- sooner, would starve a large one. An interactive caller ignores and takes over a batch
-- caller's claim; a batch caller never takes an interactive one's.
local function bucket_check(b)
  local key, cost = b.key, b.cost
  local claimant = b.claims and lease_id or nil
  local level, cap, rate = bucket_load(key, b.per_minute, b.burst, cost, b.minute_window)
  local need = math.min(cost, cap)
  local hold = cap / rate
  local front_i = line_front(key, b.interactive_line_key, INTERACTIVE)
  local front_b = interactive and {} or line_front(key, b.batch_line_key, BATCH)
  local s = redis.call('HMGET', key, 'head', 'tail', 'ihead', 'itail', 'reserved_avg', 'settled_avg',
                       't:' .. lease_id, 'claim_id', 'claim_tokens', 'claim_until', 'claim_since', 'claim_lane',
                       'vtime', 'ratio_n')
  local waiting_b = (tonumber(s[2]) or 0) - (tonumber(s[1]) or 0)
  local waiting_i = (tonumber(s[4]) or 0) - (tonumber(s[3]) or 0)
  local place = place_read(s[7])
  local held, ours, free, takeover = 0, false, true, false
  if claimant then
    ours = s[8] == claimant
    free = not s[8] or tonumber(s[10]) <= now
    if not free and not ours then
      local claim_interactive = s[12] == 'interactive'
      if interactive and not claim_interactive then
        takeover = true
      elseif interactive == claim_interactive then
        takeover = waiting_since < (tonumber(s[11]) or now)
      end
      if not takeover then held = tonumber(s[9]) end
    end
  end
  local tag = nil  -- a batch newcomer's start tag
  local position
  if place then
    position = place[1]
  elseif interactive then
    position = tonumber(s[4]) or 0
  else
    tag = batch_tag(b, tonumber(s[13]))
    position = tag
  end
  local kept = 0  -- for callers ahead, but those later than `hold` past their turn
  for _, entry in ipairs(front_i) do
    local other = entry[2]
    if (not interactive or other[1] < position) and other[3] >= now - hold then kept = kept + other[2] end
  end
  for _, entry in ipairs(front_b) do
    local other = entry[2]
    if other[1] < position and other[3] >= now - hold then kept = kept + other[2] end
  end
  kept = math.min(kept, cap / 2)
  local room = (level - held - kept - need) / cap
  if level - held + EPSILON >= need + kept then
    return 0, {level = level - cost, cap = cap, rate = rate, claimed = ours or takeover, place = place, tag = tag},
      place, need, room
  end
  local ahead
  if interactive then
    ahead = waiting_i  -- a newcomer: behind every interactive caller
    if place then ahead = line_ahead(key, b.interactive_line_key, position, waiting_i) end
  else
    local last = (not place) and redis.call('ZRANGE', b.batch_line_key, -1, -1, 'WITHSCORES') or {}
    if not place and (not last[2] or tonumber(last[2]) <= position) then
      ahead = waiting_i + waiting_b  -- a newcomer whose tag is the highest: behind everyone
    else
      ahead = waiting_i + line_ahead(key, b.batch_line_key, position, waiting_b)
    end
  end
  local ratio = 1  -- requests; tokens before any settle, for a caller told again
  if claimant and tonumber(s[5]) and (place or probe or (tonumber(s[14]) or 0) >= RATIO_SETTLED) then
    ratio = math.max(MIN_RATIO, math.min(MAX_RATIO, tonumber(s[6]) / tonumber(s[5])))
  elseif claimant and not place then
    ratio = RATIO_PRIOR
  end
  if not place and not probe then ratio = ratio * (1 - PLAN_EARLY) end  -- a probe compares waits as they are
  local first = ahead <= EPSILON
  local turn = (math.max(ahead * ratio, kept) + need - level + (first and held or 0)) / rate
  -- Never sooner than the bucket could pass what it is short now (a claim held for another caller
  -- included): a caller held in its worker would otherwise ask again and again for nothing.
  turn = math.max(turn, (kept + held + need - level) / rate)
  if claimant and first and (free or ours or takeover) and join then
    redis.call('HSET', key, 'cap', cap, 'claim_id', claimant, 'claim_tokens', need,
               'claim_until', fmt(now + math.max(0, turn) + call.claim_grace_s),
               'claim_since', fmt(waiting_since), 'claim_lane', interactive and 'interactive' or 'batch')
  end
  -- Told again, a caller aims a little past its turn: a little late costs nothing (the bucket
  -- keeps its tokens), a little early one more ask.
  if place then turn = turn + hold * REPLAN_LATE end
  return math.max(MIN_WAIT_S, turn), {tag = tag}, place, need, room
end

-- A refused caller keeps its place, or joins its lane's line (a batch caller at its flow's tag);
-- it is due back in `wait_s`.
local function line_wait(b, place, need, wait_s, tag)
  local key = b.key
  local line_key = interactive and b.interactive_line_key or b.batch_line_key
  local line = interactive and INTERACTIVE or BATCH
  local position
  if place then
    position, need = place[1], place[2]
  else
    local waiting = tonumber(redis.call('HGET', key, line.tail)) or 0
    position = interactive and waiting or tag
    redis.call('HSET', key, line.tail, fmt(waiting + need))
    redis.call('ZADD', line_key, fmt(position), lease_id)
    if not interactive then
      redis.call('HSETNX', key, 'vtime', fmt(0))
      flow_advance(b, tag, need)
      keep_until(b.flows_key, now + wait_s + call.line_grace_s)
    end
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

local taken, places, needs, tags = {}, {}, {}, {}
local least_room = 1
for i, b in ipairs(call.buckets) do
  local wait_s, after, place, need, room = bucket_check(b)
  consider(wait_s, b.limit)
  taken[i], places[i], needs[i], tags[i] = wait_s <= 0 and after, place, need, after.tag
  least_room = math.min(least_room, room)
end

if probe then
  local in_flight, placed = 0, 0
  for _, slot in ipairs(call.slots) do in_flight = math.max(in_flight, redis.call('ZCARD', slot.key)) end
  for i in ipairs(call.buckets) do if places[i] then placed = 1 end end
  return {'granted', worst_wait > 0 and 0 or 1, 'wait_s', fmt(worst_wait), 'limit', worst_limit, 'at_s', fmt(now),
          'room', fmt(least_room), 'in_flight', in_flight, 'placed', placed}
end

if worst_wait > 0 then
  for i, b in ipairs(call.buckets) do
    -- Callers wait in line where they are short, and keep any place they hold elsewhere.
    if join and (places[i] or not taken[i]) then line_wait(b, places[i], needs[i], worst_wait, tags[i]) end
  end
  return {'granted', 0, 'wait_s', fmt(worst_wait), 'limit', worst_limit, 'at_s', fmt(now)}
end

for i, after in pairs(taken) do
  local b = call.buckets[i]
  bucket_store(b.key, after.level, after.cap, after.rate)
  if after.claimed then
    redis.call('HDEL', b.key, 'claim_id', 'claim_tokens', 'claim_until', 'claim_since', 'claim_lane')
  end
  if after.place then
    local line_key = interactive and b.interactive_line_key or b.batch_line_key
    line_leave(b.key, line_key, interactive and INTERACTIVE or BATCH, lease_id, after.place)
  end
  if not interactive then
    -- The batch lane's virtual time moves to the tag served, but never past a caller still
    -- waiting: tokens nobody came for go to whoever is there (a caller far back, a newcomer), and
    -- a flow arriving later must still start beside the front of the line, not behind it. A
    -- newcomer served at once moves its flow on as if it had waited; flows that finished before
    -- the virtual time are forgotten.
    local served = after.place and after.place[1] or after.tag
    local first = redis.call('ZRANGE', b.batch_line_key, 0, 0, 'WITHSCORES')
    if first[2] then served = math.min(served, tonumber(first[2])) end
    local vtime = math.max(tonumber(redis.call('HGET', b.key, 'vtime')) or 0, served)
    redis.call('HSET', b.key, 'vtime', fmt(vtime))
    if not after.place then
      flow_advance(b, after.tag, math.min(b.cost, after.cap))
      keep_until(b.flows_key, now + after.cap / after.rate)
    end
    redis.call('ZREMRANGEBYSCORE', b.flows_key, '-inf', '(' .. fmt(vtime))
  end
end
for _, slot in ipairs(call.slots) do
  redis.call('ZADD', slot.key, fmt(now + call.lease_ttl_s), lease_id)
  zset_touch(slot.key)
end
for _, ring in ipairs(call.rings) do ring_add(ring.key, 1, call.tokens) end
local spare = 1
for _, after in pairs(taken) do spare = math.min(spare, after.level / after.cap) end
return {'granted', 1, 'wait_s', fmt(0), 'limit', '', 'at_s', fmt(now), 'spare', fmt(spare)}
