"""A machine of an operator: it holds one copy of every shard of the guild (``app.py``)."""
