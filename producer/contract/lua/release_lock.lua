-- Delete a lock only if the caller still holds it (compare-and-delete).
-- KEYS[1]  the lock key
-- ARGV[1]  the caller's lock token
-- Returns 1 when the lock was held by the caller and is now deleted, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
