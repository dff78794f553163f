"""`ldmflow encode`: raw shards -> latent shards (training.loader.latents), through the config's frozen
VAE and text encoder on Ray workers, resumable shard by shard; the manifest is written last.

- shard_encoder: one raw shard -> one latent shard, published whole (what each worker runs)
- job: the plan, the workers, what a rerun keeps, and the manifest (`encode_dataset`, the entry the CLI
  and a flow call)
"""
