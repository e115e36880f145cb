"""Export: a finished dataset's ok rows as trainer-ready WebDataset shards or FaceCaption-v2 Parquet."""
