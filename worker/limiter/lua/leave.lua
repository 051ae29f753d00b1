-- leave: a caller waiting in line goes elsewhere (another member of its pool took it): it leaves
-- the lines it waits in and gives up its claim, so nothing is kept for it. Runs after prelude.lua.
--
-- KEYS: every `*key` field below (the prelude checks each is declared).
--
-- ARGV[1], a JSON object:
--   lease_id   the caller's lease, as at acquire
--   buckets[]  key: bucket hash (acquire.lua), interactive_line_key, batch_line_key: its two lines
--
-- Returns: left (how many lines it left).

local left = 0
for _, b in ipairs(call.buckets) do
  local entry = redis.call('HGET', b.key, 't:' .. call.lease_id)
  if entry then
    local need = tonumber(string.match(entry, '^%S+ (%S+) %S+$')) or 0
    for line_key, head in pairs({[b.interactive_line_key] = 'ihead', [b.batch_line_key] = 'head'}) do
      if redis.call('ZREM', line_key, call.lease_id) == 1 then
        redis.call('HSET', b.key, head, fmt((tonumber(redis.call('HGET', b.key, head)) or 0) + need))
        left = left + 1
      end
    end
    redis.call('HDEL', b.key, 't:' .. call.lease_id)
  end
  if redis.call('HGET', b.key, 'claim_id') == call.lease_id then
    redis.call('HDEL', b.key, 'claim_id', 'claim_tokens', 'claim_until', 'claim_since', 'claim_lane')
  end
end
return {'left', left}
