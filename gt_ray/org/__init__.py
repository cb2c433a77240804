"""The organization side: what an organization runs on its own machine, with no Ray and no
provider code. The private data never leaves the process; only the update vector file does.

An organization reads its private data, fine-tunes the pair card's TinyLM with LoRA from
the card's init (optionally under DP-SGD, and with the vector mechanism and its budget
ledger), writes the update vector file, sends it to the provider's service, and checks
the round's adapter on its own test data.

- :mod:`gt_ray.org.data`: :func:`~gt_ray.org.data.load_org_examples` (a data file, a
  :class:`gt_ray.tasks.DatasetSpec`, or ``generated:SPEC`` text parsed by
  :func:`~gt_ray.org.data.parse_generated_spec`), :func:`~gt_ray.org.data.card_data_format`.
- :mod:`gt_ray.org.finetune`: :func:`~gt_ray.org.finetune.finetune_org` (privacy notes in
  its module docstring), :func:`~gt_ray.org.finetune.follow_recipe`,
  :func:`~gt_ray.org.finetune.load_org_model`, :func:`~gt_ray.org.finetune.open_ledger`.
- :mod:`gt_ray.org.evaluate`: :func:`~gt_ray.org.evaluate.evaluate_adapter`,
  :func:`~gt_ray.org.evaluate.unpack_adapter`.
- :mod:`gt_ray.org.client`: :func:`~gt_ray.org.client.submit_vector` (the service's HTTP
  API is in its module docstring), :func:`~gt_ray.org.client.default_idempotency_key`.

The command line (``gt-ray org finetune|evaluate|submit``) is :mod:`jobs.org`.
"""
