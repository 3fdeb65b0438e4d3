"""The developer's own app: the ``@splitspace.gpu`` decorator and finding its functions in a Blocks.

Both tiers import this: the frontend serves the app's Blocks and forwards each decorated
function; the GPU tier serves only the decorated functions. ``ui_text.py``: the words of the
pages (the built-in's, an app's waits). May import contract and config.
"""
