"""The SQL ledger: the store that writes it, the rows it takes, and the outbox that feeds it."""
