"""The `hata-jax` command line (installed as `hata_jax.cli`): the top layer, above `hata_jax.train`
and `hata_jax.evaluation`; the entry point is :func:`hata_jax.cli.main.main`."""
