"""Scale-out on Ray Serve: engine replicas behind a prefix-aware router (`serve.py`).

Ray is the optional extra `slimserve[ray]`; nothing else in slimserve imports this package.
"""
