-- snapshot: usage against each limit now, for `llmq providers` and the health records. Reads only.
-- Runs after prelude.lua.
--
-- KEYS: every `*key` field below (the prelude checks each is declared).
--
-- ARGV[1], a JSON object:
--   pauses[]   key: string, paused until (epoch s)
--   slots[]    limit (config name), key: sorted set, lease id -> lease expiry (epoch s)
--   daily_key  hash: day (UTC days since epoch) and one counter per quota field
--   quotas[]   limit, field (its counter in daily_key)
--   usage[]    limit, measure (requests | tokens), key: usage ring hash (prelude's ring_add)
--
-- Returns: at_s (Redis time), paused_until_s (epoch s; 0 when not paused), then for each limit
-- its usage: calls in flight (slots), today's count (quotas), or the last 60 s (usage).

-- Requests and tokens in the ring's slots of the last 60 seconds.
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
  return {requests = math.max(0, requests), tokens = math.max(0, tokens)}
end

local answer = {'at_s', fmt(now), 'paused_until_s', fmt(paused_until(call.pauses))}
local function tell(limit, value)
  answer[#answer + 1] = limit
  answer[#answer + 1] = value
end

for _, slot in ipairs(call.slots) do tell(slot.limit, redis.call('ZCOUNT', slot.key, '(' .. fmt(now), '+inf')) end
local used = daily_read(call.daily_key, call.quotas)
for _, quota in ipairs(call.quotas) do tell(quota.limit, fmt(used[quota.field])) end
local rings = {}
for _, item in ipairs(call.usage) do
  rings[item.key] = rings[item.key] or ring_sum(item.key)
  tell(item.limit, rings[item.key][item.measure])
end
return answer
