"""An operator's Cashu mint: ``python -m services.ecash`` (``app.py``)."""
