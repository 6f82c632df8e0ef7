"""The public API: transactions in, receipts, lookups, websocket pushes."""
