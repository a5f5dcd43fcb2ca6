"""Training of the hash projections (see the training issue)."""
