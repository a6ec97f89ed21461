"""The runtime every node role shares: one node is an HTTP process and a scheduler process.

    HTTP process (app.py: routes.py, admin.py)      scheduler process (process.py)
    tokenize, format, stream  --messages.py over channel.py-->  NodeLoop (loop.py) steps the
                                                                engine; kv_link.py gives the
                                                                transfer layer the engine's pages

`prefill/` and `decode/` add only their loop (`PrefillLoop`, `DecodeLoop`); `server.serve_node`
runs either. This room imports `engine`, `transfer` and `api`, never a role.
"""
