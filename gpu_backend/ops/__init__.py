"""For operators: the admin API, the dashboard, metrics and the operators' door.

May import admission, stores and splitspace.shared.
"""
