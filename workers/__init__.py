"""eventspec's worker processes: one OS process per model (`python -m workers --role draft|target`).

Importing this package must not import torch: the coordinator uses workers.inputs for sample discovery.
"""
