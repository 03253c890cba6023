"""Task families: each samples meta-batches of support / query sets."""
