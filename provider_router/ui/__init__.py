"""The dashboard at `/ui`: requests, conversations drawn as trees, stats over time, live.

`handlers` has the routes (off without `auth.admin_key`), `views` and `conversation` the
pages, `html` the escaping builder every page goes through, `static/` the CSS and script.
"""
