"""The ledger: one record per request, what it cost, and what it saved."""
