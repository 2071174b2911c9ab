"""ears-vllm: Efficient Adaptive Rejection Sampling for speculative decoding, as a vLLM plugin.

``import ears_vllm`` needs only torch: vLLM is imported lazily by the adapters, never here.
"""

from ears_vllm.config import EarsConfig
from ears_vllm.reference import VerifyResult
from ears_vllm.verify import verify

__all__ = ["EarsConfig", "VerifyResult", "verify"]
__version__ = "0.1.0"
