"""The work the GPU does: the text-to-image model, batching, cost estimates, ``@spaces.GPU``.

May import splitspace.shared only.
"""
