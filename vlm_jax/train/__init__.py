"""The training loop, sharding and checkpointing shared by every method."""
