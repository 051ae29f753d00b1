-- Settle a chunk a flusher has handled, only while it holds the lock, in one step: drop the
-- chunk from the head of the outbox and add the rows the ledger refused to the dead-letter list.
-- KEYS[1]  the outbox list (keys.OUTBOX)
-- KEYS[2]  the outbox lock (keys.OUTBOX_LOCK)
-- KEYS[3]  the dead-letter list (keys.OUTBOX_DEAD)
-- KEYS[4]  the count of rows quarantined so far (keys.OUTBOX_QUARANTINED)
-- ARGV[1]  the flusher's lock token
-- ARGV[2]  how many rows to drop from the head
-- ARGV[3..] one JSON dead-letter record per refused row (none when every row was written)
-- Returns 1 when settled, 0 when the lock is no longer ours (nothing changes: the next holder
-- writes the chunk again, and its writes are idempotent).
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
redis.call('LTRIM', KEYS[1], tonumber(ARGV[2]), -1)
if #ARGV > 2 then
  redis.call('RPUSH', KEYS[3], unpack(ARGV, 3))
  redis.call('INCRBY', KEYS[4], #ARGV - 2)
end
return 1
