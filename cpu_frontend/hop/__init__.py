"""The CPU-to-GPU hop: one transport interface, its transports, several GPU tiers.

May import splitspace.shared and splitspace.session.
"""
