"""Where images come from and how they decode: items and sources (folders, CSVs, URLs, tar shards, tables), image decoding and preprocessing."""
