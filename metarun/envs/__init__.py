"""Reinforcement-learning task distributions (``navigation2d``; ``locomotion``: MuJoCo robots).

Nothing is imported here: each module loads its own dependencies, so ``import metarun.envs`` stays free of
gymnasium and MuJoCo.
"""
