"""Evaluation nodes: IdentityScore, CLIPScore and EvalAggregate (``scores.py``); the maths lives in
``py/evaluate/``, the command-line harness in ``scripts/evaluate.py``.
"""
