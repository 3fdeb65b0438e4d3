"""What people see: the Gradio page, its words, the embedding examples.

May import door, hop and splitspace.shared.
"""
