"""Measurement: prompt sets and their seeded splits (with the shipped data), batched greedy
generation, judges, the measures (harmful rate, over-refusal, task score, fidelity) and the
evaluation of a model. Imports model/ and the base modules only."""
