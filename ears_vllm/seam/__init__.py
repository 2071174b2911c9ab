"""The seam between ears-vllm and vLLM: where vLLM's verification is patched and its structures translated.

It imports vLLM only inside functions, so ``import ears_vllm`` needs only torch. The layers and what each may
import: docs/architecture.md.

* :mod:`~ears_vllm.seam.verification`: the one decision "does ears-vllm verify on this runner, and why";
* :mod:`~ears_vllm.seam.patches`: every change made to vLLM, kept and listed;
* :mod:`~ears_vllm.seam.hooks`: checking that a hook is where, and what, an adapter expects;
* :mod:`~ears_vllm.seam.vllm_v1` and :mod:`~ears_vllm.seam.vllm_mrv2`: one adapter per vLLM model runner;
* :mod:`~ears_vllm.seam.vllm_requests`: per-request settings, checked where vLLM builds a request;
* :mod:`~ears_vllm.seam.vllm_races`: ERSD's keyed sampling (V1 and MRV2), and :mod:`~ears_vllm.seam.vllm_drafter`:
  AdaSD's draft length (V1), each installed only for its policy.

docs/vllm-seam.md says which vLLM releases it supports and how it absorbs the next one.
"""
