-- Drop the rows a flusher has written from the head of the outbox, only while it holds the lock.
-- KEYS[1]  the outbox list (keys.OUTBOX)
-- KEYS[2]  the outbox lock (keys.OUTBOX_LOCK)
-- ARGV[1]  the flusher's lock token
-- ARGV[2]  how many rows to drop from the head
-- Returns 1 when trimmed, 0 when the lock is no longer ours (nothing changes).
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('LTRIM', KEYS[1], tonumber(ARGV[2]), -1)
  return 1
end
return 0
