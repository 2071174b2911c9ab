"""The seam between ears-vllm and vLLM: the only code that imports vLLM, and only inside functions.

* :mod:`~ears_vllm.seam.verification`: the one decision "does ears-vllm verify on this runner, and why";
* :mod:`~ears_vllm.seam.patches`: every change made to vLLM, kept and listed;
* :mod:`~ears_vllm.seam.hooks`: checking that a hook is where, and what, an adapter expects;
* :mod:`~ears_vllm.seam.vllm_v1` and :mod:`~ears_vllm.seam.vllm_mrv2`: one adapter per vLLM model runner.

docs/vllm-seam.md says which vLLM releases it supports and how it absorbs the next one.
"""
