"""Light clients: the guild's checkpoints, the commitments under them, and the proofs a
wallet checks without trusting the operator that serves them."""
