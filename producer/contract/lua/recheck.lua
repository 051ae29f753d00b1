-- After Redis restarted: look again soon at every job that was published and not yet claimed.
--
-- A message a worker had just popped (BRPOP) when Redis died never reached it, and a
-- message a worker could not hand back during the outage stays in kombu's unacked set
-- until the broker's visibility timeout; the jobs' watchdog entries (promote.lua) would
-- only look at them after the full in-flight grace (30 s). This brings each such entry
-- forward to `soon`: then promote.lua republishes the job if its queue is empty, or looks
-- again while the queue drains. A second message for the same dispatch is dropped by
-- claim.lua, so a job whose message was not lost still runs once.
--
-- KEYS[1] delayed zset
-- ARGV[1] recheck_in_ms  ARGV[2] job key prefix  ARGV[3] offset  ARGV[4] limit
-- Returns {moved, scanned}: entries brought forward, entries looked at (page by offset + scanned - moved).
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local soon = now_ms + tonumber(ARGV[1])
local entries = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. soon, '+inf', 'LIMIT', tonumber(ARGV[3]), tonumber(ARGV[4]))
local moved = 0
for _, job_id in ipairs(entries) do
  local fields = redis.call('HMGET', ARGV[2] .. job_id, 'state', 'dispatch', 'published')
  local state, dispatch, published = fields[1], fields[2], fields[3]
  local waiting = state == 'queued' or state == 'retrying' or state == 'rate_limited'
  if waiting and dispatch and dispatch == published then
    redis.call('ZADD', KEYS[1], soon, job_id)
    moved = moved + 1
  end
end
return {moved, #entries}
