"""Reading and writing checkpoints: safetensors headers, lazy tensor loads, streamed shard writes."""
