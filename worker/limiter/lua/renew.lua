-- renew: extend a long call's lease, so its concurrency slots outlast it. Runs after prelude.lua.
--
-- KEYS: every `*key` field below (the prelude checks each is declared).
--
-- ARGV[1], a JSON object:
--   lease_id     the call's lease, as at acquire
--   lease_ttl_s  the lease now ends this long from now
--   slots[]      key: sorted set, lease id -> lease expiry (epoch s)
--
-- Returns: held 1 when the lease was still held (and is now extended), else 0.

local held = 0
for _, slot in ipairs(call.slots) do
  if redis.call('ZSCORE', slot.key, call.lease_id) then
    redis.call('ZADD', slot.key, fmt(now + call.lease_ttl_s), call.lease_id)
    zset_touch(slot.key)
    held = 1
  end
end
return {'held', held}
