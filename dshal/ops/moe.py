"""(op family; see dshal/ops/spec.py)"""
