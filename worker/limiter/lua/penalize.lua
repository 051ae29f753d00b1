-- penalize: pause a provider, one of its models or one of its API keys for every worker, after a
-- 429 or headers saying a limit is spent. A pause only ever lengthens. Runs after prelude.lua.
--
-- KEYS: pause_key (the prelude checks it is declared).
--
-- ARGV[1], a JSON object:
--   pause_key  string: paused until (epoch s), expiring with the pause
--   pause_s    pause until now + pause_s, unless a longer pause is already on
--
-- Returns: paused_until_s (epoch s, string): the end of the pause now in force.

local pause_end = now + call.pause_s
local current = tonumber(redis.call('GET', call.pause_key))
if current and current > pause_end then return {'paused_until_s', fmt(current)} end
redis.call('SET', call.pause_key, fmt(pause_end), 'PX', math.ceil((pause_end - now) * 1000) + 1)
return {'paused_until_s', fmt(pause_end)}
