"""The seam between ears-vllm and vLLM: the only layer that maps vLLM's structures and changes vLLM.

It is the only code that imports vLLM (only inside functions), but for four modules that must and say why in
``tests/test_imports.py``: ``_log`` (vLLM's logger), ``doctor`` (runs vLLM's own ``expand_batch_to_tokens``),
``cli`` (bundles vLLM's sources) and ``bench`` (runs vLLM's engine and kernels).

* :mod:`~ears_vllm.seam.patches`: every change made to vLLM, listed as data in one manifest and applied by one
  function;
* :mod:`~ears_vllm.seam.hooks`: checking that a hook is where, and what, an adapter expects; which runners the
  installed vLLM has;
* :mod:`~ears_vllm.seam.verification`: the one decision "does ears-vllm verify on this runner, and why";
* :mod:`~ears_vllm.seam.vllm_v1` and :mod:`~ears_vllm.seam.vllm_mrv2`: one adapter per vLLM model runner (they
  register their counters in :mod:`ears_vllm.stats_registry`);
* :mod:`~ears_vllm.seam.vllm_requests`: per-request settings, from vLLM's requests to the verifier;
* :mod:`~ears_vllm.seam.vllm_drafter` (V1), :mod:`~ears_vllm.seam.vllm_mrv2_drafter` (MRV2) and
  :mod:`~ears_vllm.seam.vllm_races`: AdaSD's draft length and ERSD's keyed sampling, on vLLM's drafter and sampler.

The layers and what each may import: docs/architecture.md. Which vLLM releases it supports, what is patched,
and how it absorbs the next one: docs/vllm-seam.md.
"""
