"""Dataset writer: kept and flipped pairs to versioned Parquet shards, exactly once."""
