"""How one PPO minibatch splits into micro-batches: the forward/backward passes whose gradients accumulate into the
minibatch's one optimiser step.

- **By rows** (``ppo.micro_batch_size``): each process takes every N-th row of the minibatch (so the minibatches do
  not depend on the number of processes) and cuts its share into passes of that many rows.
- **By tokens** (``ppo.micro_batch_tokens``): each process's share, shortest rows first, is packed into passes of at
  most that many token positions, padding included: a pass costs its rows x (its longest prompt + its longest
  response), since `Batch.select` trims each pass to its own longest row. Short rows then share a pass and a long
  row does not pad a dozen short ones. The number of passes varies from minibatch to minibatch, and every process
  runs the same number (a ZeRO-3 forward is a collective: a process with a pass fewer would leave the others
  waiting), which each process works out alone, since every process holds the whole global batch.

The gradient does not depend on the split: each pass's loss is a sum over its tokens or sequences divided by the
whole minibatch's count (`rlhf.ppo.losses`), and `accumulating` syncs and steps once, at the minibatch's last pass.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


def padded_positions(rows: torch.Tensor, prompt_lengths: torch.Tensor, response_lengths: torch.Tensor) -> int:
    """Token positions of one pass over ``rows``, padding included: rows x (longest prompt + longest response)."""
    if not len(rows):
        return 0
    return len(rows) * int(prompt_lengths[rows].max() + response_lengths[rows].max())


def pack_by_tokens(rows: torch.Tensor, prompt_lengths: torch.Tensor, response_lengths: torch.Tensor,
                   max_tokens: int) -> list[torch.Tensor]:
    """``rows`` in order of length (prompt + response, shortest first; ties keep their order), packed greedily into
    passes of at most ``max_tokens`` padded positions. A row longer than the budget alone gets a pass of its own
    (the config check keeps the budget above the longest row a rollout can have)."""
    rows = rows[(prompt_lengths[rows] + response_lengths[rows]).argsort(stable=True)]
    passes, start, longest_prompt, longest_response = [], 0, 0, 0
    for i, row in enumerate(rows.tolist()):
        prompt, response = max(longest_prompt, int(prompt_lengths[row])), max(longest_response,
                                                                             int(response_lengths[row]))
        if i > start and (i - start + 1) * (prompt + response) > max_tokens:
            passes.append(rows[start:i])
            start, prompt, response = i, int(prompt_lengths[row]), int(response_lengths[row])
        longest_prompt, longest_response = prompt, response
    if start < len(rows):
        passes.append(rows[start:])
    return passes


def split_to(passes: list[torch.Tensor], count: int, prompt_lengths: torch.Tensor,
             response_lengths: torch.Tensor) -> list[torch.Tensor]:
    """``passes`` made ``count`` passes by halving, each time, the costliest pass that has more than one row (the
    halves stay in place, shorter rows first). ``count`` may not exceed the number of rows."""
    passes = list(passes)
    while len(passes) < count:
        splittable = [i for i, p in enumerate(passes) if len(p) > 1]
        i = max(splittable, key=lambda j: padded_positions(passes[j], prompt_lengths, response_lengths))
        half = (len(passes[i]) + 1) // 2
        passes[i:i + 1] = [passes[i][:half], passes[i][half:]]
    return passes


def micro_batches(rows: torch.Tensor, process_index: int, num_processes: int, *, max_rows: int,
                  max_tokens: int | None, prompt_lengths: torch.Tensor,
                  response_lengths: torch.Tensor) -> list[torch.Tensor]:
    """This process's passes over minibatch ``rows`` (global row indices, in the order they are dealt): its share
    is every ``num_processes``-th row from ``process_index``; cut into passes of ``max_rows`` rows, or packed by
    ``max_tokens`` (when set) into as many passes as the process that needs the most. prompt_lengths,
    response_lengths: [B] over the global batch."""
    share = rows[process_index::num_processes]
    if max_tokens is None:
        return list(share.split(max_rows))
    packed = [pack_by_tokens(rows[p::num_processes], prompt_lengths, response_lengths, max_tokens)
              for p in range(num_processes)]
    return split_to(packed[process_index], max(len(p) for p in packed), prompt_lengths, response_lengths)


@contextlib.contextmanager
def accumulating(accelerator: Any, model: Any, *, last: bool) -> Iterator[None]:
    """accelerate's ``accumulate()`` for a number of passes that varies from one minibatch to the next: gradients
    stay local (DDP's ``no_sync``) until the minibatch's ``last`` pass, which syncs them and lets the optimiser step
    (and tells DeepSpeed's engine it is at its accumulation boundary: accelerate passes ``sync_gradients`` on)."""
    accelerator.sync_gradients = last
    with contextlib.nullcontext() if last else accelerator.no_sync(model):
        yield
