-- Remove a job from the delayed set only if its score is still the one we saw:
-- after a publish, without undoing a newer schedule made meanwhile.
--
-- KEYS[1] delayed zset
-- ARGV pairs: job_id, score, ...
local removed = 0
for i = 1, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return removed
