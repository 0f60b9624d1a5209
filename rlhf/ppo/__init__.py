"""PPO for language models: pure tensor math (``masked``, ``kl``, ``advantages``, ``losses``) and the rollout helpers
(``sampling``, ``rollout``) that turn a policy and a reward model into training batches.

Shapes: ``B`` sequences, ``T`` response tokens, ``V`` vocabulary entries. Masks are True (or 1) on valid tokens; a
response mask is a prefix mask (the valid tokens of a row come first, padding after). Nothing here imports
accelerate, deepspeed, peft or a tracker.
"""
