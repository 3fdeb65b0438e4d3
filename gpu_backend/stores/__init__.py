"""What admission counts per client: usage, slots, rates, service, in memory, SQLite or Redis.

May import splitspace.shared only.
"""
