"""Data: the dataset formats (a pickled dict, a folder of Parquet files), safe loading, the order of samples
(a function of seed and epoch only), sharding across ranks (a function of rank and world size only) and
augmentation. It imports `storage` for remote files, and never Ray."""
