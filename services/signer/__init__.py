"""The guild's threshold signer: ChillDKG key generation and ROAST signing over NATS."""
