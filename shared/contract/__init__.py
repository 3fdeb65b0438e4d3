"""What crosses between the tiers and reaches clients: schema, hop types, errors, headers, quotas.

Imports nothing else of splitspace.
"""
