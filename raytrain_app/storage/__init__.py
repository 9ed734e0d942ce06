"""Storage: a `Location` is a local path or a URI (s3://, gs://) with its pyarrow filesystem, and every write to
one is published atomically (a reader sees a whole file or none). The bottom layer: it imports nothing else of
the package, and never Ray."""
