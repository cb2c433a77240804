"""Aggregation rounds on the provider side: round state, persistence, and the round's LLM update.

No Ray and no HTTP here: ``serve/`` wraps this module, and everything in it runs and is
tested in a plain Python process (the translator is passed in as a callable).

Modules: :mod:`~gt_ray.rounds.spec` (what a round is: spec, state, receipts, errors, file
names), :mod:`~gt_ray.rounds.update` (the round's LLM update and its PEFT adapter and zip),
:mod:`~gt_ray.rounds.store` (:class:`RoundStore`: the state directory, its lock and the
operations). The names below are the public API; ``from gt_ray.rounds import RoundStore``.

A round
-------
The provider opens a round with a :class:`RoundSpec`; organizations submit TinyLM update
vectors (:meth:`RoundStore.submit`, the bytes of the file ``gt-ray org finetune`` wrote);
:meth:`RoundStore.close` computes the round's LLM update through a ``translate`` callable;
:meth:`RoundStore.export_adapter` writes it as a PEFT adapter directory plus a zip of it.

Modes
-----
- ``aggregate_then_translate`` (**the default**): aggregate the TinyLM vectors, translate
  the aggregate once. This is what the paper does, and it is the default because (1) the
  aggregation rule, the clipping and the central DP noise act on what the organizations
  actually sent, in the space where their own vector mechanism clipped, so a poisoned
  vector is trimmed away *before* it reaches the (nonlinear, unbounded) translator, and
  noise added to the aggregate stays DP through the translation (post-processing);
  (2) it costs one translation per round, not one per organization. The price: the
  translator sees an average of updates, which is in its training distribution only as
  far as the shadow corpus' task mixtures cover such averages (to first order the mean of
  small updates is the update on the pooled data, so they mostly do).
- ``translate_then_aggregate``: translate every vector, aggregate the LLM vectors. For a
  linear translator and the (weighted) mean both modes agree.
- ``weight_space`` (a flag on ``translate_then_aggregate`` with ``mean``/``weighted_mean``):
  averaging LoRA factors is not averaging LoRA products (``mean(B) mean(A)`` has cross
  terms), so the adapter instead stacks every organization's factors into one LoRA of rank
  ``n r`` whose product is exactly the (weighted) mean of the products ``B_i A_i``
  (:func:`gt_ray.aggregate.stack_lora_factors`); ``lora_alpha`` is scaled so that PEFT's
  ``lora_alpha / r`` stays the card's.

State directory
---------------
::

    {state_dir}/store.json                                 the card this store belongs to
    {state_dir}/rounds/{round_id}/round.json               spec, status, receipts, result
    {state_dir}/rounds/{round_id}/submissions/{org}.safetensors   accepted bytes, verbatim
    {state_dir}/rounds/{round_id}/result/llm_update.safetensors   the round's LLM update
    {state_dir}/rounds/{round_id}/result/translated.safetensors   per-organization LLM vectors
    {state_dir}/rounds/{round_id}/result/adapter/ and adapter.zip the PEFT adapter

Every file is written under a temporary name, fsynced and ``os.replace``d into place
(:func:`gt_ray.storage.open_output`); ``round.json`` is written last and is the commit
point (a vector file it does not list is an orphan of a crash and is overwritten by the
next accepted submission). Writers hold a per-round ``flock``, so threads and processes
sharing the directory take turns, and every operation re-reads ``round.json``: a restarted
service loses no accepted submission.

What a submission must be
-------------------------
Besides a valid file for the card's TinyLM layout
(:func:`gt_ray.wire.parse_update_bytes`): not all zeros (a fine-tune that learned nothing,
which would only dilute a mean), and, when the store has a
:class:`~gt_ray.wire.NormBound`, an L2 norm inside the range of the shadow corpus' TinyLM
updates widened by a factor. The bound comes from ``input_norms.json`` beside the
translator checkpoint (:func:`gt_ray.wire.write_norm_bound`,
:func:`gt_ray.wire.load_norm_bound`). A round whose rule is robust (``median``,
``trimmed_mean``) may set ``accept_outliers``: one outlier cannot move such a rule far,
and the round may want to see what arrives.

Idempotency
-----------
Per organization and round: a submission whose ``Idempotency-Key`` (or, without a key,
whose exact bytes) the organization already used returns the first receipt again with
``duplicate=True``, also after the round closed; the same key with other bytes, or other
bytes for an organization that already holds a slot, is a :class:`RoundConflictError`.
"""

from gt_ray.rounds.spec import (DEFAULT_MODE, ROUND_MODES, ROUND_STATUSES, OrgNotExpectedError, Receipt,
                                RoundConflictError, RoundError, RoundSpec, RoundState, Submission, UnknownRoundError)
from gt_ray.rounds.store import RoundStore
from gt_ray.rounds.update import RoundUpdate, Translate, compute_round_update, write_stacked_adapter, zip_directory

__all__ = [
    "DEFAULT_MODE", "ROUND_MODES", "ROUND_STATUSES", "OrgNotExpectedError", "Receipt", "RoundConflictError",
    "RoundError", "RoundSpec", "RoundState", "RoundStore", "RoundUpdate", "Submission", "Translate",
    "UnknownRoundError", "compute_round_update", "write_stacked_adapter", "zip_directory",
]
