-- Take jobs that wait in a provider entry's intake into one new provider batch: the intent to
-- submit it, recorded before any call to the provider (worker/batches/assemble.py).
--
-- A job is taken only if it still waits to be grouped (state in_provider_batch, in no provider
-- batch yet): a job cancelled or failed past its deadline meanwhile just leaves the intake. A
-- taken job starts an attempt (attempt and hop_attempt counted, started_at now), the same as
-- claim.lua starts one for a worker; the attempt ends when its line's result is settled.
--
-- KEYS[1] provider batch hash  KEYS[2] provider batch job-id list  KEYS[3] intake zset
-- KEYS[4] open provider batches zset  KEYS[5] outbox list
-- ARGV[1] provider batch id  ARGV[2] job key prefix  ARGV[3] batch key prefix
-- ARGV[4] suffix of an llmq batch's provider-batch set  ARGV[5] ms until its first poll
-- ARGV[6] JSON object of the provider batch's fields (provider, model, endpoint, window_s, ...)
-- ARGV[7..] job ids, in line order
-- Returns the job ids taken, in line order ({} when none was: no provider batch is made).
local pb_id = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {}
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local taken = {}
local batches = {}
for i = 7, #ARGV do
  local job_id = ARGV[i]
  local job_key = ARGV[2] .. job_id
  local job = redis.call('HMGET', job_key, 'state', 'provider_batch', 'batch_id')
  redis.call('ZREM', KEYS[3], job_id)
  if job[1] == 'in_provider_batch' and (job[2] == false or job[2] == '') then
    redis.call('HSET', job_key, 'provider_batch', pb_id, 'updated_at', now_ms, 'started_at', now_ms)
    redis.call('HINCRBY', job_key, 'attempt', 1)
    redis.call('HINCRBY', job_key, 'hop_attempt', 1)
    redis.call('RPUSH', KEYS[2], job_id)
    redis.call('RPUSH', KEYS[5], cjson.encode({kind = 'provider_batch_line', provider_batch_id = pb_id, job_id = job_id}))
    taken[#taken + 1] = job_id
    if job[3] and job[3] ~= '' and not batches[job[3]] then
      batches[job[3]] = true
      redis.call('SADD', ARGV[3] .. job[3] .. ARGV[4], pb_id)
    end
  end
end
if #taken == 0 then
  return {}
end
local batch_ids = {}
for batch_id, _ in pairs(batches) do batch_ids[#batch_ids + 1] = batch_id end
local fields = cjson.decode(ARGV[6])
fields['provider_batch_id'] = pb_id
fields['state'] = 'submitting'
fields['lines'] = #taken
fields['batch_ids'] = cjson.encode(batch_ids)
fields['created_at'] = now_ms
fields['updated_at'] = now_ms
local flat = {}
for name, value in pairs(fields) do
  flat[#flat + 1] = name
  flat[#flat + 1] = tostring(value)
end
redis.call('HSET', KEYS[1], unpack(flat))
redis.call('ZADD', KEYS[4], now_ms + tonumber(ARGV[5]), pb_id)
fields['kind'] = 'provider_batch'
redis.call('RPUSH', KEYS[5], cjson.encode(fields))
return taken
