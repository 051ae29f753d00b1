-- Move a job from one state to another in one atomic step, keeping its batch's
-- counts, the lease / delayed / deadline sets and the SQL outbox in step.
--
-- KEYS[1] job hash   KEYS[2] job attempts list   KEYS[3] batch hash key prefix (the job's batch_id completes it)
-- KEYS[4] leases zset  KEYS[5] delayed zset  KEYS[6] deadlines zset  KEYS[7] outbox list
-- ARGV[1] expected dispatch ("" = any)
-- ARGV[2] allowed current states, comma-separated
-- ARGV[3] new state
-- ARGV[4] delay_ms: >= 0 schedules a (re)publish that many ms from now; -1 does not
-- ARGV[5] 1 to start a new dispatch (the next message for this job), else 0
-- ARGV[6] ttl_s applied when the new state is terminal
-- ARGV[7] attempt record JSON, recorded whatever the outcome ("" = none); when the job does
--         not move, its outcome becomes "cancelled" or "superseded"
-- ARGV[8] outbox rows, a JSON array pushed whatever the outcome ("" = none; attempt rows
--         are marked the same way)
-- ARGV[9..] field, value pairs to set on the job hash
-- Returns {1, old_state, dispatch} when moved, {0, current_state or "missing", dispatch} when not.
local function terminal(state)
  return state == 'succeeded' or state == 'failed' or state == 'cancelled'
end
local current = redis.call('HMGET', KEYS[1], 'state', 'dispatch', 'batch_id', 'job_id')
local state, dispatch, batch_id, job_id = current[1], current[2], current[3], current[4]
-- A finished job never moves again, whatever the caller allows: its result is final.
local moves = state ~= nil and not terminal(state) and (ARGV[1] == '' or ARGV[1] == dispatch)
if moves then
  moves = false
  for name in string.gmatch(ARGV[2], '[^,]+') do
    if name == state then moves = true end
  end
end
-- What happened is on record whatever the outcome; an attempt whose result no longer
-- moves the job (cancelled meanwhile, or superseded after its lease ran out) says so.
local late_outcome = (state == 'cancelled') and 'cancelled' or 'superseded'
if ARGV[8] ~= '' then
  for _, row in ipairs(cjson.decode(ARGV[8])) do
    if not moves and row['kind'] == 'attempt' then row['outcome'] = late_outcome end
    redis.call('RPUSH', KEYS[7], cjson.encode(row))
  end
end
if state and ARGV[7] ~= '' then
  -- One record per attempt number: a late result replaces the reaper's worker_lost record.
  local record = cjson.decode(ARGV[7])
  if not moves then record['outcome'] = late_outcome end
  local replaced = false
  for index, item in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
    if cjson.decode(item)['attempt'] == record['attempt'] then
      redis.call('LSET', KEYS[2], index - 1, cjson.encode(record))
      replaced = true
    end
  end
  if not replaced then redis.call('RPUSH', KEYS[2], cjson.encode(record)) end
end
if not state then
  return {0, 'missing', '0'}
end
if not moves then
  return {0, state, dispatch}
end
local new_state = ARGV[3]
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fields = {}
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], 'state', new_state, 'updated_at', now_ms, unpack(fields))
if ARGV[5] == '1' then
  dispatch = tostring(redis.call('HINCRBY', KEYS[1], 'dispatch', 1))
end
if batch_id and batch_id ~= '' and new_state ~= state then
  redis.call('HINCRBY', KEYS[3] .. batch_id, state, -1)
  redis.call('HINCRBY', KEYS[3] .. batch_id, new_state, 1)
end
if new_state ~= 'running' then
  redis.call('ZREM', KEYS[4], job_id)
end
if tonumber(ARGV[4]) >= 0 then
  redis.call('ZADD', KEYS[5], now_ms + tonumber(ARGV[4]), job_id)
else
  redis.call('ZREM', KEYS[5], job_id)
end
if terminal(new_state) then
  redis.call('HSET', KEYS[1], 'finished_at', now_ms)
  redis.call('ZREM', KEYS[6], job_id)
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[6]))
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[6]))
  redis.call('RPUSH', KEYS[7], cjson.encode({kind = 'job', job_id = job_id}))
end
return {1, state, dispatch}
