"""AIOS's /query (opt-in): routes over the edge."""
