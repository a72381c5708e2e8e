"""The seam every engine is written against: embed, block, head over pure pytrees.

A model is split into three stages so that the ZO engines (resident MeZO, offloaded ZO2, evaluation)
are written once, not once per architecture:

    ctx          = model.context(batch)                  # positions, masks, rope tables
    h_BxTxD      = model.embed(outer, batch)
    h_BxTxD      = model.block(blocks[i], h_BxTxD, ctx)  # for i in range(model.num_blocks)
    loss_B, logits_BxTxV = model.head(outer, h_BxTxD, batch)

`outer` holds the embeddings, the final norm and the LM head (tied embeddings live here once, so
embed and head see the same perturbation); `blocks` is a list with one pytree per layer, all with the
same structure. All parameter pytrees are plain nested dicts of arrays.

A batch is a dict of int32 arrays of shape [B, T]:
    input_ids       token ids
    attention_mask  1 for real tokens, 0 for padding (left or right)
    loss_mask       1 where token t is a target (predicted from position t-1); the per-example loss
                    is the mean negative log-likelihood over the masked targets. Defaults to
                    attention_mask when absent.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

PyTree = Any
Batch = dict[str, jax.Array]


@runtime_checkable
class Seam(Protocol):
    num_blocks: int

    def context(self, batch: Batch) -> PyTree: ...

    def embed(self, outer: PyTree, batch: Batch) -> jax.Array: ...

    def block(self, block_params: PyTree, h: jax.Array, ctx: PyTree) -> jax.Array: ...

    def head(self, outer: PyTree, h: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]: ...

    def decay_mask(self, params: PyTree) -> PyTree:
        """Pytree of bools like `params` (outer or one block): True where weight decay applies
        (matrices and embeddings), False for biases and norm scales (MeZO's rule)."""
        ...
