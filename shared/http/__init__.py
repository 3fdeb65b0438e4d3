"""Each tier's HTTP edge: the guard in front of the app, JSON body limits, uvicorn's options.

May import contract and config.
"""
