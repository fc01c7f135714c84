"""Managed API keys and the audit trail, kept in the ledger's database."""
