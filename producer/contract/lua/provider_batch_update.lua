-- Record what a provider batch did (submitted, polled, cancelled, ended), schedule its next poll,
-- and queue its new state for the SQL ledger, in one step. An ended provider batch never changes.
--
-- KEYS[1] provider batch hash  KEYS[2] open provider batches zset  KEYS[3] outbox list
-- ARGV[1] provider batch id
-- ARGV[2] ms until its next poll; -1 takes it off the open set (it ended)
-- ARGV[3] JSON object of fields to set (strings and numbers; "" clears a field)
-- Returns 1 when the record changed, 0 when there is none or it had ended.
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'ended' then
  return 0
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fields = cjson.decode(ARGV[3])
fields['updated_at'] = now_ms
local flat = {}
for name, value in pairs(fields) do
  flat[#flat + 1] = name
  flat[#flat + 1] = tostring(value)
end
redis.call('HSET', KEYS[1], unpack(flat))
if tonumber(ARGV[2]) >= 0 then
  redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[2]), ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
-- The ledger row carries the whole record as it now stands.
local record = redis.call('HGETALL', KEYS[1])
local row = {kind = 'provider_batch'}
for i = 1, #record, 2 do row[record[i]] = record[i + 1] end
redis.call('RPUSH', KEYS[3], cjson.encode(row))
return 1
