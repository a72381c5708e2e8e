"""The layer both engines stand on; it imports nothing from zo2_jax but itself.

- `storage`: how parameters are kept between steps (`Storage`: float32, bfloat16, float16, int8;
  round-to-nearest or stochastic rounding).
- `noise`: the keyed directions z, regenerated from (step key, direction, part, leaf path).
- `transforms`: `mezo_sgd` and the checks on optax transforms applied block by block.
- `parts`: the per-part math of a step (deferred update, perturbed branches, head), written once
  for both engines.
- `common`: option checks, the engine spec, and state metadata shared by both engines.
- `trees`: pytree sizes and stacking.
"""
