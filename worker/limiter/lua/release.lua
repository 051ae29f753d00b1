-- release: a call failed. Free its concurrency slots; its request and tokens stay counted in the
-- buckets, as the provider counted them. Runs after prelude.lua.
--
-- KEYS: every `*key` field below (the prelude checks each is declared).
--
-- ARGV[1], a JSON object:
--   lease_id  the call's lease, as at acquire
--   slots[]   key: sorted set of leases in flight, freed of this lease
--
-- Returns: held 1 when the lease was still held, else 0.

return {'held', lease_drop(call.slots, call.lease_id)}
