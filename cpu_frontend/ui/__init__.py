"""What people see beside the app's own page: an app's GPU events on the page, the embedding examples.

(The built-in's page is ``builtin/page.py``; the words of every page, ``shared/app/ui_text.py``.)

May import door, hop and splitspace.shared.
"""
