"""The code store: HDF5 root over immutable segments, journal, lock, reader, check; a store in object storage."""
