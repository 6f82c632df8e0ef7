"""Constellation's pure core: data types, codecs, crypto and state machines.

Nothing in this package performs I/O, reads a clock, or imports asyncio, NATS,
aiohttp, asyncpg or redis; the services under ``services/`` wrap it.
"""

__version__ = "0.1.0"
