-- settle: a call finished. Its token buckets and usage rings count what the provider counted,
-- the daily counters its real usage, and its concurrency slots are freed. Runs after prelude.lua.
--
-- KEYS: every `*key` field below (the prelude checks each is declared).
--
-- ARGV[1], a JSON object:
--   lease_id         the call's lease, as at acquire
--   reserved_tokens  tokens reserved at acquire
--   settled_tokens   tokens the per-minute buckets settle to (what the provider counted): the
--                    difference from reserved_tokens is returned to, or taken from, each bucket
--   buckets[]        the token buckets: per_minute, burst (tokens), key: bucket hash (acquire.lua)
--   rings[]          key: usage ring hash, corrected by the same difference
--   daily_key        hash: day (UTC days since epoch) and one counter per quota field
--   spent[]          field (a counter in daily_key), amount (what the call used: tokens, USD)
--   slots[]          key: sorted set of leases in flight, freed of this lease
--
-- Returns: held 1 when the lease was still held, else 0 (its slot had expired without us).

local RATIO_WEIGHT = 0.05  -- each settle moves a token bucket's `ratio` at least this far toward its own

-- Count what the provider counted (`delta` more than reserved) and learn what reservations cost
-- of themselves, for acquire's plan of the line.
local function bucket_adjust(key, per_minute, base_cap, delta, reserved)
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

-- Daily counters start again each UTC day and outlive it by a day.
local function daily_add(key, spent)
  if tonumber(redis.call('HGET', key, 'day')) ~= today then
    redis.call('DEL', key)
    redis.call('HSET', key, 'day', today)
  end
  for _, item in ipairs(spent) do
    if item.amount ~= 0 then redis.call('HINCRBYFLOAT', key, item.field, fmt(item.amount)) end
  end
  redis.call('EXPIRE', key, 2 * 86400)
end

local reserved = call.reserved_tokens
local delta = call.settled_tokens - reserved
for _, b in ipairs(call.buckets) do bucket_adjust(b.key, b.per_minute, b.burst, delta, reserved) end
if delta ~= 0 then
  for _, ring in ipairs(call.rings) do ring_add(ring.key, 0, delta) end
end
daily_add(call.daily_key, call.spent)
return {'held', lease_drop(call.slots, call.lease_id)}
