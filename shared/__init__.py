"""SynPref shared library: config, wire-format helpers, Kafka I/O, model loading."""
