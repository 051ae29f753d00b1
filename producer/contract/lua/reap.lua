-- Sweep what no live worker is looking after:
--   leases that ran out (the worker died): the job gets a new dispatch and is due now;
--   deadlines that passed: the job fails with DeadlineExceededError (and stays due in the
--   delayed set, for promote.lua to hand it out once so that a worker tells Flower).
--
-- KEYS[1] leases zset  KEYS[2] deadlines zset  KEYS[3] delayed zset  KEYS[4] outbox list
-- ARGV[1] job key prefix ("<prefix>:job:")  ARGV[2] batch key prefix ("<prefix>:batch:")
-- ARGV[3] max jobs per sweep  ARGV[4] ttl_s for failed records
-- Returns {requeued job ids..., "|", failed job ids...}
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[3])
local function move_batch(job_key, from, to)
  local batch_id = redis.call('HGET', job_key, 'batch_id')
  if batch_id and batch_id ~= '' then
    redis.call('HINCRBY', ARGV[2] .. batch_id, from, -1)
    redis.call('HINCRBY', ARGV[2] .. batch_id, to, 1)
  end
end
local out = {}
for _, job_id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, limit)) do
  local job_key = ARGV[1] .. job_id
  redis.call('ZREM', KEYS[1], job_id)
  if redis.call('HGET', job_key, 'state') == 'running' then
    redis.call('HSET', job_key, 'state', 'retrying', 'updated_at', now_ms, 'hop_attempt',
      math.max(0, tonumber(redis.call('HGET', job_key, 'hop_attempt') or '1') - 1))
    redis.call('HINCRBY', job_key, 'dispatch', 1)
    -- The lost attempt goes on record, in Redis and in the SQL ledger (times in epoch seconds).
    local fields = redis.call('HMGET', job_key, 'attempt', 'route', 'route_index', 'started_at')
    local hop = cjson.decode(fields[2])[tonumber(fields[3]) + 1]
    local started_s = tonumber(fields[4] or now_ms) / 1000
    local record = {attempt = tonumber(fields[1]), provider = hop['provider'], model = hop['model'],
      outcome = 'worker_lost', started_at = started_s, finished_at = now_ms / 1000,
      error_type = 'WorkerLost', error_message = 'the worker running this attempt stopped renewing its lease'}
    redis.call('RPUSH', job_key .. ':attempts', cjson.encode(record))
    record['kind'] = 'attempt'
    record['job_id'] = job_id
    redis.call('RPUSH', KEYS[4], cjson.encode(record))
    move_batch(job_key, 'running', 'retrying')
    redis.call('ZADD', KEYS[3], now_ms, job_id)
    out[#out + 1] = job_id
  end
end
out[#out + 1] = '|'
for _, job_id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms, 'LIMIT', 0, limit)) do
  local job_key = ARGV[1] .. job_id
  redis.call('ZREM', KEYS[2], job_id)
  local state = redis.call('HGET', job_key, 'state')
  if state and state ~= 'succeeded' and state ~= 'failed' and state ~= 'cancelled' then
    local deadline_at = tonumber(redis.call('HGET', job_key, 'deadline_at'))
    local error = cjson.encode({type = 'DeadlineExceededError', retryable = false,
      message = 'job did not finish before its deadline (' .. (deadline_at - tonumber(redis.call('HGET', job_key, 'created_at'))) / 1000 .. ' s after submission); raise jobs.deadline_s or the request deadline'})
    redis.call('HSET', job_key, 'state', 'failed', 'error', error, 'updated_at', now_ms, 'finished_at', now_ms)
    redis.call('HINCRBY', job_key, 'dispatch', 1)
    move_batch(job_key, state, 'failed')
    redis.call('ZREM', KEYS[1], job_id)
    redis.call('ZADD', KEYS[3], now_ms, job_id)
    redis.call('EXPIRE', job_key, tonumber(ARGV[4]))
    redis.call('RPUSH', KEYS[4], cjson.encode({kind = 'job', job_id = job_id}))
    out[#out + 1] = job_id
  end
end
return out
