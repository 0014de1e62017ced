"""Image-text memory: embedding a corpus into shards and searching it."""
