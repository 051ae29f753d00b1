-- The limiter's prelude: loaded in front of every limiter script (worker/limiter/scripts.py
-- joins them), so each operation stays one atomic script on Redis's clock.
--
-- Arguments. Every script takes one argument, ARGV[1]: a JSON object of named values and named
-- groups (lists of objects, e.g. a bucket = key, line_key, per_minute, burst, cost) that the
-- script loops over. Each script's header lists its fields.
--
-- Keys. Every Redis key a script touches is a field of ARGV[1] whose name ends in `key` (a
-- bucket's `key` and `line_key`, `daily_key`, ...), and is declared in KEYS too, as Redis asks
-- of scripts; KEYS carry nothing else, in no particular order. The prelude refuses a call that
-- names a key it did not declare. producer/contract/keys.py builds every name.
--
-- Results. A flat list of alternating names and values. Floats go back as strings (`fmt`):
-- Redis turns Lua numbers into integers.

-- Redis < 5 replicates scripts verbatim and refuses writes after TIME; this switches to
-- replicating the writes (a no-op from Redis 5 on).
if redis.replicate_commands then redis.replicate_commands() end

local clock = redis.call('TIME')
local now_s = tonumber(clock[1])
local now = now_s + tonumber(clock[2]) / 1000000

local call = cjson.decode(ARGV[1])

local declared = {}
for _, name in ipairs(KEYS) do declared[name] = true end
local function check_declared(value)
  for field, item in pairs(value) do
    if type(item) == 'table' then
      check_declared(item)
    elseif type(field) == 'string' and string.sub(field, -3) == 'key' and not declared[item] then
      error('llmq limiter: ' .. field .. ' ' .. tostring(item) .. ' is not declared in KEYS')
    end
  end
end
check_declared(call)

local RATE_MARGIN = 0.005          -- refill 0.5% slower than the limit: room for clock and network jitter
local MAX_CAPACITY_FRACTION = 0.5  -- a token bucket grows to fit one reservation, up to half a minute's tokens

local today = math.floor(now_s / 86400)  -- UTC days since the epoch: what daily quotas count by

local function fmt(x) return string.format('%.6f', x) end

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

-- A bucket's level now (in its units), capacity and refill rate (units per second).
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
  keep_until(key, now + math.max(0, cap - level) / rate)
end

-- A usage ring: 60 one-second slots of requests and tokens (`s<slot>` its second, `r<slot>`,
-- `t<slot>`), for reports of the last minute; the buckets alone decide what is granted.
local function ring_add(key, requests, tokens)
  local slot = now_s % 60
  if tonumber(redis.call('HGET', key, 's' .. slot)) ~= now_s then
    redis.call('HSET', key, 's' .. slot, now_s, 'r' .. slot, 0, 't' .. slot, 0)
  end
  if requests ~= 0 then redis.call('HINCRBY', key, 'r' .. slot, requests) end
  if tokens ~= 0 then redis.call('HINCRBY', key, 't' .. slot, tokens) end
  redis.call('EXPIRE', key, 120)
end

-- What each quota's counter holds today: field -> amount (0 for a counter of another day).
local function daily_read(key, quotas)
  local used = {}
  if #quotas == 0 then return used end
  local fields = {'day'}
  for i, quota in ipairs(quotas) do fields[i + 1] = quota.field end
  local v = redis.call('HMGET', key, unpack(fields))
  local current = tonumber(v[1]) == today
  for i, quota in ipairs(quotas) do
    used[quota.field] = current and tonumber(v[i + 1]) or 0
  end
  return used
end

-- The latest end (epoch s) of the pauses that apply; 0 when none does.
local function paused_until(pauses)
  local latest = 0
  for _, pause in ipairs(pauses) do
    local v = tonumber(redis.call('GET', pause.key))
    if v and v > latest then latest = v end
  end
  return latest
end

-- Free a call's concurrency slots; 1 when it still held one (its lease had not expired).
local function lease_drop(slots, lease_id)
  local held = 0
  for _, slot in ipairs(slots) do held = math.max(held, redis.call('ZREM', slot.key, lease_id)) end
  return held
end
