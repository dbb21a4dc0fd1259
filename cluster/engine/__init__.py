"""The tinygrad shard engine and the process it runs in."""
