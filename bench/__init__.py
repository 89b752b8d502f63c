"""The echo benchmark: portside against its peers and the machine's limit (issue 4).

Run ``python -m bench --help`` from the repository root; bench/README.md explains the method.
"""
