"""psai's benchmarks: the same work done through psai and through the raw
driver (sqlite3 or psycopg2), on the same rows and indexes, as ratios.
Run ``python -m bench`` (or ``make bench``)."""
