"""Pallas (Triton backend) GPU kernels. Each public kernel has the signature of its pure-JAX
reference in `hata_jax` plus `interpret: bool` (run it on the CPU with the Pallas interpreter)."""
