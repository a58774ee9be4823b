"""Subgame solvers (group ``solver``): one loss each plus its exact population update.

Language-model solvers: dpo, ipo, iter_ipo, sppo, sppo_hard, inpo, mpo. Exact-game only:
nash_md, extragradient. See ``docs/solvers.md`` for the formulas and their derivations.
"""
