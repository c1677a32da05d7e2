"""Hybrid short/long RL: GRPO (grpo.py), rewards (rewards.py), rollouts (rollout.py), the loop (train.py)."""
