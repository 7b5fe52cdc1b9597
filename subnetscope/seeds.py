"""The seeds a run derives from its one `--seed`, and why each constant has the value it has.

A random stream that advances with a counter (an optimizer step, a pass over the prompts) is seeded
`seed * stride + counter`. While 0 <= counter < stride, that map is one-to-one: no two (seed, counter)
pairs share a stream, so run 1's step 1 never draws run 0's step `stride + 1` windows and seeds compared
in one study stay independent. The strides are primes by convention; what matters is that each exceeds
the counters it is used with.
"""
from __future__ import annotations

# counters that stay in the thousands: passes over the prompt set (the RL trainers' prompt order) and the
# testbed's pre-training steps (2000 by default); 7919 is the 1000th prime
SHORT_STRIDE = 7919
# optimizer steps of any training run (LM windows, PPO's minibatch order): the first prime above 10^6
STEP_STRIDE = 1_000_003
# the sampler's `step` for evaluation rollouts, whose Gumbel noise is a hash of (seed, step, row, ...):
# the first prime above 10^9, a step no training run reaches, so evaluation never reuses a training batch's noise
EVAL_SAMPLING_STEP = 1_000_000_007


def stream_seed(seed: int, counter: int, stride: int) -> int:
    """The seed of `counter`'s stream within a run of seed `seed` (one-to-one while 0 <= counter < stride)."""
    return seed * stride + counter
