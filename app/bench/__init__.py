"""``dfine-serve bench``: a load generator with an in-process ceiling and a plain peer."""
